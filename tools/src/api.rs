//! The server's HTTP API (`/v1/...`): identities, publishing a module, calling reducers
//! and SQL. Used by `khala up`, the admin commands, the mirror and the test harness.

use crate::error::{Result, ToolError};
use crate::metrics_text::Samples;
use khala_proto::CodedError;
use serde_json::{json, Value};
use std::time::Duration;


/// An identity and the token that proves it.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// 64 hex digits, no `0x`.
    pub identity: String,
    pub token: String,
}

impl Credentials {
    /// The identity as a reducer argument in the server's JSON encoding.
    pub fn identity_arg(&self) -> Value {
        identity_arg(&self.identity)
    }
}

/// The identity a token speaks for: the `hex_identity` claim of the JWT the server
/// minted (64 hex digits, no `0x`). `None` if the token is not such a JWT.
pub fn token_identity(token: &str) -> Option<String> {
    use base64::Engine as _;
    let claims = token.trim().split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(claims.trim_end_matches('=')).ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    Some(claims["hex_identity"].as_str()?.trim_start_matches("0x").to_ascii_lowercase())
}

/// Reads an identity the server wrote either as a hex string or as `{"__identity__": "0x.."}`.
fn identity_value(value: &Value) -> Option<String> {
    let text = value.as_str().or_else(|| value["__identity__"].as_str())?;
    Some(text.trim_start_matches("0x").to_ascii_lowercase())
}

/// An `Identity` reducer argument: `{"__identity__": "0x<hex>"}`.
pub fn identity_arg(hex: &str) -> Value {
    json!({ "__identity__": format!("0x{}", hex.trim_start_matches("0x")) })
}

/// Bytes as a reducer argument (the server reads `Vec<u8>` from a hex string).
pub fn bytes_arg(bytes: &[u8]) -> Value {
    Value::String(hex::encode(bytes))
}

/// An `Option<T>` reducer argument.
pub fn option_arg(value: Option<Value>) -> Value {
    match value {
        Some(v) => json!({ "some": v }),
        None => json!({ "none": [] }),
    }
}

/// One `PublishEvent` reducer argument (the module's `publish_event_type`).
pub fn publish_event_arg(idempotency_key: &str, kind: &str, payload: &[u8], authority_seq: Option<u64>, occurred_at_micros: i64) -> Value {
    json!({
        "idempotency_key": idempotency_key,
        "kind": kind,
        "payload": bytes_arg(payload),
        "authority_seq": option_arg(authority_seq.map(|s| json!(s))),
        "occurred_at_micros": occurred_at_micros,
    })
}

/// The rows of one SQL statement.
#[derive(Debug, Clone)]
pub struct SqlRows {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

impl SqlRows {
    /// The value of `column` in `row`.
    pub fn get<'a>(&self, row: &'a [Value], column: &str) -> Option<&'a Value> {
        self.columns.iter().position(|c| c == column).and_then(|i| row.get(i))
    }
}

#[derive(Debug, Clone)]
pub struct Api {
    base: String,
    http: reqwest::blocking::Client,
}

impl Api {
    pub fn new(base_url: &str) -> Api {
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .expect("a TLS-capable HTTP client builds");
        Api { base: base_url.trim_end_matches('/').to_string(), http }
    }

    /// Like [`Api::new`], with every request bounded by `timeout` (the smoke test's
    /// promise to finish in seconds holds for a server that stops answering, too).
    pub fn with_timeout(base_url: &str, timeout: Duration) -> Api {
        let http = reqwest::blocking::Client::builder().timeout(timeout).build().expect("a TLS-capable HTTP client builds");
        Api { base: base_url.trim_end_matches('/').to_string(), http }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn http_error(what: &str, e: impl std::fmt::Display) -> ToolError {
        ToolError::Http { what: what.into(), detail: e.to_string() }
    }

    fn check(what: &str, response: reqwest::blocking::Response) -> Result<String> {
        let status = response.status();
        let body = response.text().unwrap_or_default();
        if status.is_success() {
            Ok(body)
        } else {
            Err(ToolError::HttpStatus { what: what.into(), status: status.as_u16(), body: body.trim().into() })
        }
    }

    /// Sends `request`: `None` if the server answers 404 (no such database or route), else
    /// the body of a successful answer.
    fn body_unless_missing(what: &str, request: reqwest::blocking::RequestBuilder) -> Result<Option<String>> {
        let response = request.send().map_err(|e| Self::http_error(what, e))?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Self::check(what, response).map(Some)
    }

    /// Mints a new identity (`POST /v1/identity`).
    pub fn new_identity(&self) -> Result<Credentials> {
        let what = "creating an identity";
        let response = self.http.post(format!("{}/v1/identity", self.base)).send().map_err(|e| Self::http_error(what, e))?;
        let body: Value = serde_json::from_str(&Self::check(what, response)?).map_err(|e| Self::http_error(what, e))?;
        match (body["identity"].as_str(), body["token"].as_str()) {
            (Some(identity), Some(token)) => Ok(Credentials { identity: identity.trim_start_matches("0x").to_string(), token: token.into() }),
            _ => Err(Self::http_error(what, format!("unexpected reply {body}"))),
        }
    }

    /// Creates or updates database `name` with `wasm`, as the identity behind `token`.
    /// `clear` wipes its data first.
    pub fn publish_module(&self, name: &str, wasm: &[u8], token: &str, clear: bool) -> Result<()> {
        let what = format!("publishing the module to database {name}");
        let response = self
            .http
            .put(format!("{}/v1/database/{name}", self.base))
            .query(&[("clear", clear)])
            .bearer_auth(token)
            .header("content-type", "application/wasm")
            .body(wasm.to_vec())
            .send()
            .map_err(|e| Self::http_error(&what, e))?;
        // 400 is the server refusing the update itself (a schema change it cannot migrate).
        if response.status() == reqwest::StatusCode::BAD_REQUEST {
            let detail = response.text().unwrap_or_default().trim().to_string();
            return Err(ToolError::ModuleRejected { database: name.to_string(), detail });
        }
        Self::check(&what, response).map(|_| ())
    }

    /// Calls `reducer` with JSON `args` (an array). A reducer error comes back as
    /// [`ToolError::Reducer`] with its parsed `code: message`.
    pub fn call(&self, database: &str, reducer: &str, args: Value, token: &str) -> Result<()> {
        self.call_timed(database, reducer, args, token).map(|_| ())
    }

    /// [`Api::call`], returning how long the reducer ran inside the module as the server
    /// reports it (`spacetime-execution-duration-micros`), when it does.
    pub fn call_timed(&self, database: &str, reducer: &str, args: Value, token: &str) -> Result<Option<Duration>> {
        let what = format!("calling {reducer} on {database}");
        let response = self
            .http
            .post(format!("{}/v1/database/{database}/call/{reducer}", self.base))
            .bearer_auth(token)
            .json(&args)
            .send()
            .map_err(|e| Self::http_error(&what, e))?;
        let status = response.status();
        let executed = response
            .headers()
            .get("spacetime-execution-duration-micros")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_micros);
        let body = response.text().unwrap_or_default();
        if status.is_success() {
            return Ok(executed);
        }
        // 530 is the server's "the reducer returned an error"; its body is our message.
        if status.as_u16() == 530 {
            return Err(ToolError::Reducer { reducer: reducer.into(), error: CodedError::parse(&body) });
        }
        Err(ToolError::HttpStatus { what, status: status.as_u16(), body: body.trim().into() })
    }

    /// Whether database `name` exists (`GET /v1/database/NAME` answers 404 when not).
    pub fn database_exists(&self, name: &str) -> Result<bool> {
        let what = format!("reading database {name}");
        Ok(Self::body_unless_missing(&what, self.http.get(format!("{}/v1/database/{name}", self.base)))?.is_some())
    }

    /// The identity that owns database `name` (`GET /v1/database/NAME`).
    pub fn database_owner(&self, name: &str) -> Result<String> {
        self.database_field(name, "owner_identity")
    }

    /// Database `name`'s own identity (`GET /v1/database/NAME`): the `db` label of its
    /// metrics.
    pub fn database_identity(&self, name: &str) -> Result<String> {
        self.database_field(name, "database_identity")
    }

    /// An identity field of `GET /v1/database/NAME`, as lowercase hex.
    fn database_field(&self, name: &str, field: &str) -> Result<String> {
        let what = format!("reading database {name}");
        let response = self.http.get(format!("{}/v1/database/{name}", self.base)).send().map_err(|e| Self::http_error(&what, e))?;
        let body: Value = serde_json::from_str(&Self::check(&what, response)?).map_err(|e| Self::http_error(&what, e))?;
        identity_value(&body[field]).ok_or_else(|| Self::http_error(&what, format!("no {field} in {body}")))
    }

    /// Runs one SQL statement and returns its rows.
    pub fn sql(&self, database: &str, query: &str, token: &str) -> Result<SqlRows> {
        let what = format!("running SQL on {database}");
        let response = self
            .http
            .post(format!("{}/v1/database/{database}/sql", self.base))
            .bearer_auth(token)
            .body(query.to_string())
            .send()
            .map_err(|e| Self::http_error(&what, e))?;
        let body: Value = serde_json::from_str(&Self::check(&what, response)?).map_err(|e| Self::http_error(&what, e))?;
        let statement = &body[0];
        let columns = statement["schema"]["elements"]
            .as_array()
            .map(|els| els.iter().map(|e| e["name"]["some"].as_str().unwrap_or("").to_string()).collect())
            .unwrap_or_default();
        let rows = statement["rows"]
            .as_array()
            .map(|rows| rows.iter().map(|r| r.as_array().cloned().unwrap_or_default()).collect())
            .unwrap_or_default();
        Ok(SqlRows { columns, rows })
    }

    /// What the server says about itself on `GET /v1/health` (SpacetimeDB 1.2.0:
    /// `{"package_name", "version", "nodes", "schedulable"}`); `None` if it has no such
    /// route (404).
    pub fn server_health(&self) -> Result<Option<Value>> {
        let what = "reading the server's health";
        let Some(body) = Self::body_unless_missing(what, self.http.get(format!("{}/v1/health", self.base)))? else { return Ok(None) };
        serde_json::from_str(&body).map(Some).map_err(|e| Self::http_error(what, e))
    }

    /// The server's live heap, `jemalloc_allocated_bytes` on `GET /v1/metrics` (summed
    /// over its label sets); `None` if the server serves no such route or metric (a hosted
    /// server may not). It grows with every segment ever written until the server restarts
    /// (docs/OPERATIONS.md, "The server's memory grows with segments written").
    pub fn server_heap_bytes(&self) -> Result<Option<u64>> {
        Ok(self.server_metrics()?.and_then(|m| m.sum("jemalloc_allocated_bytes", &[])).map(|v| v as u64))
    }

    /// The server's metrics (`GET /v1/metrics`); `None` if it serves no such route.
    pub fn server_metrics(&self) -> Result<Option<Samples>> {
        let what = "reading the server's metrics";
        Ok(Self::body_unless_missing(what, self.http.get(format!("{}/v1/metrics", self.base)))?.map(|text| Samples::parse(&text)))
    }

    /// The live module's schema as `RawModuleDefV9` JSON
    /// (`GET /v1/database/NAME/schema?version=9`); `None` if the database does not exist.
    pub fn database_schema(&self, name: &str, token: Option<&str>) -> Result<Option<Value>> {
        let what = format!("reading the schema of database {name}");
        let mut request = self.http.get(format!("{}/v1/database/{name}/schema", self.base)).query(&[("version", "9")]);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let Some(body) = Self::body_unless_missing(&what, request)? else { return Ok(None) };
        serde_json::from_str(&body).map(Some).map_err(|e| Self::http_error(&what, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_identity_claim_of_a_token() {
        use base64::Engine as _;
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"hex_identity":"C2009ABC","sub":"x"}"#);
        assert_eq!(token_identity(&format!("e30.{claims}.sig")).as_deref(), Some("c2009abc"));
        assert_eq!(token_identity("not-a-jwt"), None);
        assert_eq!(identity_value(&json!({"__identity__": "0xAB"})).as_deref(), Some("ab"));
        assert_eq!(identity_value(&json!("0xab")).as_deref(), Some("ab"));
    }
}
