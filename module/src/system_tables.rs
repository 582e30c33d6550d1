//! Row-level security on two of the engine's own system tables.
//!
//! SpacetimeDB 1.2.0 makes every `st_*` table public, and `/sql` and subscriptions take
//! any identity, a throwaway anonymous one included. Without these rules anyone could
//! read, and subscribe live to:
//! - `st_client`: the identity and connection id of every connected client, so who uses
//!   Khala and when (a subscription even announces each new connection);
//! - `st_module`: the owner identity and the full module wasm.
//!
//! The engine accepts module RLS rules on system tables (they are public tables; the
//! rule is type-checked and stored like any other), applies them to SQL and to
//! subscriptions, and the owner bypasses them as usual. Their id columns are plain
//! `u128`/`u256` there, so `:sender` does not type-check and a client cannot be shown
//! its own row; each rule instead selects nothing (no client has connection id 0, no
//! database has identity 0). `tests/tests/stranger.rs` checks both tables as a non-owner
//! and as the owner.
//!
//! Not hidden, on purpose: the schema tables (`st_table`, `st_column`, `st_index`,
//! `st_constraint`, `st_scheduled`, `st_row_level_security`) say nothing the public
//! `GET /v1/database/NAME/schema` does not; `st_var` holds engine settings; `st_sequence`
//! shows each auto-increment sequence's allocation watermark, which moves in blocks of
//! 4096 ids (noted in the test).

use spacetimedb::{client_visibility_filter, Filter};

/// Non-owners see no connected client.
#[client_visibility_filter]
const HIDE_CLIENTS: Filter = Filter::Sql("SELECT * FROM st_client WHERE connection_id = 0");

/// Non-owners see neither the owner identity nor the module's wasm.
#[client_visibility_filter]
const HIDE_MODULE: Filter = Filter::Sql("SELECT * FROM st_module WHERE database_identity = 0");
