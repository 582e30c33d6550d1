//! What the server lets this client do on one stream: its grant (and lease), and
//! whether it sees the stream's row at all.

/// One stream's grant, as the `stream_grant` and `stream` rows show it.
#[derive(Debug, Default)]
pub struct Grant {
    /// `None` until the grant rows are in; then whether a subscribe grant is held.
    pub granted: Option<bool>,
    /// Whether the server shows this client the stream's row (the owner sees it
    /// without a grant: it bypasses row-level security).
    pub row_visible: bool,
    /// The grant includes `ack`, and no ack was refused as forbidden since.
    pub can_ack: bool,
    /// When the lease ends (micros since the Unix epoch); `None` with no grant.
    pub lease_expires_micros: Option<i64>,
}

impl Grant {
    /// A grant row for this identity arrived or changed.
    pub fn granted(&mut self, subscribe: bool, ack: bool, expires_at_micros: i64) {
        self.granted = Some(subscribe);
        self.can_ack = ack;
        self.lease_expires_micros = Some(expires_at_micros);
    }

    /// The grant row is gone: revoked, or its lease expired.
    pub fn ended(&mut self) {
        self.granted = Some(false);
        self.lease_expires_micros = None;
    }

    /// The subscription's first rows are in: a stream with no grant row has none.
    pub fn rows_known(&mut self) {
        self.granted.get_or_insert(false);
    }

    pub fn subscribed(&self) -> bool {
        self.granted == Some(true)
    }

    /// Neither a grant nor the stream's row: the stream is forbidden to this client.
    pub fn forbidden(&self) -> bool {
        self.granted == Some(false) && !self.row_visible
    }

    /// A refused window call means windows are not for this client: it sees the stream
    /// (as its owner) without a grant.
    pub fn owner_without_grant(&self) -> bool {
        self.row_visible && !self.subscribed()
    }

    /// Seconds left on the lease at `now_micros` (-1 with no lease known).
    pub fn lease_secs_left(&self, now_micros: i64) -> i64 {
        self.lease_expires_micros.map_or(-1, |t| (t - now_micros) / 1_000_000)
    }
}
