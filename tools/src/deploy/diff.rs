//! The difference between a live module's schema and a new one, each change classified
//! by what publishing it would do (no I/O here):
//!
//! - [`Class::Additive`]: SpacetimeDB 1.2.0 migrates the database in place and nothing
//!   that exists changes behaviour (a new table, reducer, index, exported type).
//! - [`Class::ClientBreaking`]: the server migrates in place, but something connected
//!   clients or operators depend on changes: a reducer removed or its parameters changed,
//!   a unique constraint or index dropped (generated `find` accessors, subscription
//!   joins), a table's visibility changed either way (table access or an RLS rule: rows
//!   leave live subscriptions, or become visible to identities that did not see them), an
//!   exported type renamed or removed.
//! - [`Class::DataLosing`]: 1.2.0 cannot apply it to a database that keeps its data, so
//!   the only way to publish it is to clear the database: its data is lost. Its automatic
//!   migration refuses it (`spacetimedb-schema` 1.2.0, `auto_migrate.rs`: removing a
//!   table, adding, removing, retyping or reordering a column, changing a table's type,
//!   adding a unique constraint to an existing table or changing one, changing an index's
//!   accessor name), or its migration step fails the publish (`spacetimedb-core` 1.2.0,
//!   `db/update.rs`: adding, removing or changing a table's schedule is "not yet
//!   implemented"), or the migration has no step for it and leaves the stored schema
//!   behind (a primary key change: the next publish then fails the server's
//!   compatibility check, "Primary key mismatch").
//!
//! A data-losing change to a public table also breaks clients ([`Change::breaks_clients`]).
//! Keys follow the server's: tables, columns, reducers by name; indexes, constraints and
//! sequences by their (generated) names; RLS rules by their SQL.

use super::schema::{type_name, Column, Schema, Table};
use serde::Serialize;
use std::collections::BTreeSet;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    Additive,
    ClientBreaking,
    DataLosing,
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Class::Additive => "additive",
            Class::ClientBreaking => "client_breaking",
            Class::DataLosing => "data_losing",
        }
    }
}

/// What a change is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Subject {
    Table,
    Column,
    PrimaryKey,
    Index,
    Constraint,
    Sequence,
    Schedule,
    Access,
    Reducer,
    Rls,
    Type,
    Export,
}

impl Subject {
    fn name(self) -> &'static str {
        match self {
            Subject::Table => "table",
            Subject::Column => "column",
            Subject::PrimaryKey => "primary key",
            Subject::Index => "index",
            Subject::Constraint => "constraint",
            Subject::Sequence => "sequence",
            Subject::Schedule => "schedule",
            Subject::Access => "access",
            Subject::Reducer => "reducer",
            Subject::Rls => "rls rule",
            Subject::Type => "type",
            Subject::Export => "export",
        }
    }
}

/// One difference between the live schema and the new one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub class: Class,
    /// Connected clients' bindings or subscriptions break (always for `client_breaking`;
    /// for `data_losing`, when the table is public).
    pub breaks_clients: bool,
    pub subject: Subject,
    /// `table`, `table.column`, an index name, a reducer name, an RLS rule's SQL...
    pub name: String,
    /// What changed, for people.
    pub detail: String,
}

impl Change {
    pub fn subject_name(&self) -> &'static str {
        self.subject.name()
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match (self.class, self.breaks_clients) {
            (Class::DataLosing, true) => "data_losing+client_breaking",
            (class, _) => class.name(),
        };
        write!(f, "{tag:<28} {:<11} {}: {}", self.subject.name(), self.name, self.detail)
    }
}

fn change(class: Class, subject: Subject, name: impl Into<String>, detail: impl Into<String>) -> Change {
    Change { class, breaks_clients: class == Class::ClientBreaking, subject, name: name.into(), detail: detail.into() }
}

fn params(ps: &[Column]) -> String {
    ps.iter().map(|p| format!("{}: {}", p.name, type_name(&p.ty))).collect::<Vec<_>>().join(", ")
}

/// Every change from `old` (live) to `new`, tables first, in a stable order.
pub fn diff(old: &Schema, new: &Schema) -> Vec<Change> {
    let mut out = Vec::new();
    for (name, table) in &old.tables {
        match new.tables.get(name) {
            None => {
                let mut c = change(Class::DataLosing, Subject::Table, name, format!("removed ({} table; 1.2.0 cannot drop a table in place)", table.access.to_ascii_lowercase()));
                c.breaks_clients = table.is_public();
                out.push(c);
            }
            Some(new_table) => diff_table(table, new_table, &mut out),
        }
    }
    for (name, table) in &new.tables {
        if !old.tables.contains_key(name) {
            out.push(change(Class::Additive, Subject::Table, name, format!("added ({}, {} columns)", table.access.to_ascii_lowercase(), table.columns.len())));
        }
    }

    for (name, reducer) in &old.reducers {
        match new.reducers.get(name) {
            None => {
                let kind = reducer.lifecycle.as_deref().map(|l| format!(", lifecycle {l}")).unwrap_or_default();
                out.push(change(Class::ClientBreaking, Subject::Reducer, name, format!("removed (was ({}){kind})", params(&reducer.params))))
            }
            Some(new_reducer) => {
                if reducer.params != new_reducer.params {
                    out.push(change(Class::ClientBreaking, Subject::Reducer, name, format!("parameters changed: ({}) -> ({})", params(&reducer.params), params(&new_reducer.params))));
                }
                if reducer.lifecycle != new_reducer.lifecycle {
                    let show = |l: &Option<String>| l.clone().unwrap_or_else(|| "callable".into());
                    out.push(change(Class::ClientBreaking, Subject::Reducer, name, format!("lifecycle changed: {} -> {}", show(&reducer.lifecycle), show(&new_reducer.lifecycle))));
                }
            }
        }
    }
    for (name, reducer) in &new.reducers {
        if !old.reducers.contains_key(name) {
            let kind = reducer.lifecycle.as_deref().map(|l| format!(" (lifecycle {l})")).unwrap_or_default();
            out.push(change(Class::Additive, Subject::Reducer, name, format!("added ({}){kind}", params(&reducer.params))));
        }
    }

    // A removed table's RLS rules and row type go with it (listed once, as the table).
    let gone = |table: Option<&str>| table.is_some_and(|t| old.tables.contains_key(t) && !new.tables.contains_key(t));
    let came = |table: Option<&str>| table.is_some_and(|t| new.tables.contains_key(t) && !old.tables.contains_key(t));
    let (old_rls, new_rls): (BTreeSet<&String>, BTreeSet<&String>) = (old.rls.iter().collect(), new.rls.iter().collect());
    for sql in old_rls.difference(&new_rls).filter(|sql| !gone(rls_table(sql))) {
        out.push(change(Class::ClientBreaking, Subject::Rls, *sql, "removed: rows it hid become visible to clients"));
    }
    for sql in new_rls.difference(&old_rls).filter(|sql| !came(rls_table(sql))) {
        out.push(change(Class::ClientBreaking, Subject::Rls, *sql, "added: rows it hides leave clients' subscriptions"));
    }

    let row_type_of = |schema: &Schema, name: &str| schema.row_types.iter().find(|(_, t)| t.as_str() == name).map(|(table, _)| table.clone());
    let (old_types, new_types): (BTreeSet<&String>, BTreeSet<&String>) = (old.type_names.iter().collect(), new.type_names.iter().collect());
    for name in old_types.difference(&new_types).filter(|n| !gone(row_type_of(old, n).as_deref())) {
        out.push(change(Class::ClientBreaking, Subject::Type, *name, "exported type removed or renamed (client bindings lose it)"));
    }
    for name in new_types.difference(&old_types).filter(|n| !came(row_type_of(new, n).as_deref())) {
        out.push(change(Class::Additive, Subject::Type, *name, "exported type added"));
    }
    if old.misc_exports != new.misc_exports {
        out.push(change(Class::ClientBreaking, Subject::Export, "misc_exports", "other module exports changed"));
    }
    out
}

fn diff_table(old: &Table, new: &Table, out: &mut Vec<Change>) {
    let t = &old.name;
    let public = old.is_public() || new.is_public();
    let losing = |subject, name: String, detail: String| Change { class: Class::DataLosing, breaks_clients: public, subject, name, detail };

    if old.table_type != new.table_type {
        out.push(losing(Subject::Table, t.clone(), format!("table type changed: {} -> {}", old.table_type, new.table_type)));
    }
    if old.access != new.access {
        let detail = if new.is_public() { "private -> public: every client may now subscribe to it (subject to its RLS rules)" } else { "public -> private: clients' subscriptions to it fail" };
        out.push(change(Class::ClientBreaking, Subject::Access, t, detail));
    }

    for (i, col) in old.columns.iter().enumerate() {
        let name = format!("{t}.{}", col.name);
        match new.columns.iter().position(|c| c.name == col.name) {
            None => out.push(losing(Subject::Column, name, format!("removed ({})", type_name(&col.ty)))),
            Some(j) => {
                let new_col = &new.columns[j];
                if col.ty != new_col.ty {
                    out.push(losing(Subject::Column, name.clone(), format!("type changed: {} -> {}", type_name(&col.ty), type_name(&new_col.ty))));
                }
                if i != j {
                    out.push(losing(Subject::Column, name, format!("moved from position {i} to {j}")));
                }
            }
        }
    }
    for col in &new.columns {
        if !old.columns.iter().any(|c| c.name == col.name) {
            out.push(losing(Subject::Column, format!("{t}.{}", col.name), format!("added ({}); 1.2.0 cannot add a column in place", type_name(&col.ty))));
        }
    }
    if old.primary_key != new.primary_key {
        let cols = |table: &Table| table.primary_key.iter().map(|&i| table.columns.get(i as usize).map_or_else(|| i.to_string(), |c| c.name.clone())).collect::<Vec<_>>().join(", ");
        out.push(losing(
            Subject::PrimaryKey,
            t.clone(),
            format!("changed: ({}) -> ({}); 1.2.0 keeps the stored primary key, and every later publish fails \"Primary key mismatch\"", cols(old), cols(new)),
        ));
    }

    for index in &old.indexes {
        match new.indexes.iter().find(|i| i.name == index.name) {
            None => out.push(change(Class::ClientBreaking, Subject::Index, &index.name, format!("removed from {t} (subscriptions that filter or join on it may be refused)"))),
            Some(new_index) if new_index.accessor != index.accessor => out.push(losing(
                Subject::Index,
                index.name.clone(),
                format!("accessor renamed: {} -> {}", index.accessor.as_deref().unwrap_or("none"), new_index.accessor.as_deref().unwrap_or("none")),
            )),
            Some(new_index) if new_index.algorithm != index.algorithm => {
                out.push(change(Class::ClientBreaking, Subject::Index, &index.name, format!("algorithm changed: {} -> {}", index.algorithm, new_index.algorithm)))
            }
            Some(_) => {}
        }
    }
    for index in &new.indexes {
        if !old.indexes.iter().any(|i| i.name == index.name) {
            out.push(change(Class::Additive, Subject::Index, &index.name, format!("added on {t} ({})", index.algorithm)));
        }
    }

    for constraint in &old.constraints {
        match new.constraints.iter().find(|c| c.name == constraint.name) {
            None => out.push(change(Class::ClientBreaking, Subject::Constraint, &constraint.name, format!("removed from {t} (clients' unique accessors go)"))),
            Some(c) if c.data != constraint.data => out.push(losing(Subject::Constraint, constraint.name.clone(), format!("changed: {} -> {}", constraint.data, c.data))),
            Some(_) => {}
        }
    }
    for constraint in &new.constraints {
        if !old.constraints.iter().any(|c| c.name == constraint.name) {
            out.push(losing(Subject::Constraint, constraint.name.clone(), format!("added to existing table {t} ({}); 1.2.0 cannot add it in place", constraint.data)));
        }
    }

    for seq in &old.sequences {
        match new.sequences.iter().find(|s| s.name == seq.name) {
            None => out.push(change(Class::Additive, Subject::Sequence, &seq.name, format!("removed from {t}"))),
            Some(s) if s.def != seq.def => out.push(change(Class::Additive, Subject::Sequence, &seq.name, format!("changed on {t} (the server checks existing values first)"))),
            Some(_) => {}
        }
    }
    for seq in &new.sequences {
        if !old.sequences.iter().any(|s| s.name == seq.name) {
            out.push(change(Class::Additive, Subject::Sequence, &seq.name, format!("added on {t} (the server checks existing values first)")));
        }
    }

    // 1.2.0 plans these (AddSchedule / RemoveSchedule) but its update bails on them:
    // "Adding schedules is not yet implemented" (`db/update.rs`).
    const NO_SCHEDULE_STEP: &str = "1.2.0 cannot change a schedule in place";
    match (&old.schedule, &new.schedule) {
        (None, Some(s)) => out.push(losing(Subject::Schedule, t.clone(), format!("added: rows would fire {}; {NO_SCHEDULE_STEP}", s.reducer))),
        (Some(s), None) => out.push(losing(Subject::Schedule, t.clone(), format!("removed: queued rows would no longer fire {}; {NO_SCHEDULE_STEP}", s.reducer))),
        (Some(a), Some(b)) if a != b => out.push(losing(
            Subject::Schedule,
            t.clone(),
            format!("changed: {} (column {}) -> {} (column {}); {NO_SCHEDULE_STEP}", a.reducer, a.at_column, b.reducer, b.at_column),
        )),
        _ => {}
    }
}

/// The table an RLS rule filters: `SELECT * FROM t ...` or `SELECT t.* FROM ...`.
fn rls_table(sql: &str) -> Option<&str> {
    let rest = sql.trim().strip_prefix("SELECT ").or_else(|| sql.trim().strip_prefix("select "))?.trim_start();
    if let Some(star) = rest.split_whitespace().next().and_then(|w| w.strip_suffix(".*")) {
        return Some(star);
    }
    let after_from = rest.strip_prefix('*')?.trim_start();
    let after_from = after_from.strip_prefix("FROM ").or_else(|| after_from.strip_prefix("from "))?;
    after_from.split_whitespace().next()
}

/// The most severe class present, `None` when nothing changed.
pub fn worst(changes: &[Change]) -> Option<Class> {
    changes.iter().map(|c| c.class).max()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::schema::{Constraint, Index, Reducer, Schedule, Sequence};
    use serde_json::{json, Value};

    fn col(name: &str, ty: Value) -> Column {
        Column { name: name.into(), ty }
    }

    fn u64t() -> Value {
        json!({"U64": []})
    }

    fn table(name: &str, public: bool) -> Table {
        Table {
            name: name.into(),
            columns: vec![col("id", u64t()), col("note", json!({"String": []}))],
            primary_key: vec![0],
            indexes: vec![Index { name: format!("{name}_id_idx_btree"), accessor: Some("id".into()), algorithm: json!({"BTree": [0]}) }],
            constraints: vec![Constraint { name: format!("{name}_id_key"), data: json!({"Unique": {"columns": [0]}}) }],
            sequences: vec![Sequence { name: format!("{name}_id_seq"), def: json!({"column": 0, "increment": 1}) }],
            schedule: None,
            table_type: "User".into(),
            access: if public { "Public" } else { "Private" }.into(),
        }
    }

    fn reducer(name: &str, params: Vec<Column>) -> Reducer {
        Reducer { name: name.into(), params, lifecycle: None }
    }

    fn base() -> Schema {
        let mut s = Schema::default();
        for t in [table("stream", true), table("config", false)] {
            s.tables.insert(t.name.clone(), t);
        }
        for r in [reducer("publish", vec![col("stream_id", json!({"String": []}))]), Reducer { lifecycle: Some("Init".into()), ..reducer("init", vec![]) }] {
            s.reducers.insert(r.name.clone(), r);
        }
        s.type_names = vec!["Config".into(), "Stream".into()];
        s.rls = vec!["SELECT * FROM stream WHERE owner = :sender".into()];
        s
    }

    fn only(changes: &[Change]) -> &Change {
        assert_eq!(changes.len(), 1, "{changes:#?}");
        &changes[0]
    }

    #[test]
    fn the_same_schema_has_no_changes() {
        assert!(diff(&base(), &base()).is_empty());
        assert_eq!(worst(&[]), None);
    }

    #[test]
    fn additions_are_additive() {
        let mut new = base();
        let probe = table("probe", true);
        new.tables.insert("probe".into(), probe);
        new.reducers.insert("probe_note".into(), reducer("probe_note", vec![col("note", json!({"String": []}))]));
        new.type_names.push("Probe".into());
        let changes = diff(&base(), &new);
        assert_eq!(changes.len(), 3, "{changes:#?}");
        assert!(changes.iter().all(|c| c.class == Class::Additive && !c.breaks_clients));
        assert_eq!(worst(&changes), Some(Class::Additive));
        // A new table's indexes, constraints and sequences come with it (not listed).
        assert!(changes.iter().any(|c| c.subject == Subject::Table && c.name == "probe"));
        assert!(changes.iter().any(|c| c.subject == Subject::Reducer && c.detail == "added (note: String)"));

        let mut indexed = base();
        indexed.tables.get_mut("stream").unwrap().indexes.push(Index { name: "stream_note_idx_btree".into(), accessor: Some("note".into()), algorithm: json!({"BTree": [1]}) });
        assert_eq!(only(&diff(&base(), &indexed)).class, Class::Additive);
    }

    #[test]
    fn removing_a_table_loses_data_and_a_public_one_breaks_clients() {
        let mut new = base();
        new.tables.remove("stream");
        new.tables.remove("config");
        let changes = diff(&base(), &new);
        let stream = changes.iter().find(|c| c.name == "stream").unwrap();
        let config = changes.iter().find(|c| c.name == "config").unwrap();
        assert_eq!((stream.class, stream.breaks_clients), (Class::DataLosing, true));
        assert_eq!((config.class, config.breaks_clients), (Class::DataLosing, false));
    }

    #[test]
    fn column_changes_lose_data() {
        let mut added = base();
        added.tables.get_mut("config").unwrap().columns.push(col("extra", u64t()));
        let c = only(&diff(&base(), &added)).clone();
        assert_eq!((c.class, c.subject, c.name.as_str(), c.breaks_clients), (Class::DataLosing, Subject::Column, "config.extra", false));

        let mut retyped = base();
        retyped.tables.get_mut("stream").unwrap().columns[1].ty = u64t();
        let c = only(&diff(&base(), &retyped)).clone();
        assert_eq!((c.class, c.breaks_clients), (Class::DataLosing, true));
        assert_eq!(c.detail, "type changed: String -> u64");

        let mut reordered = base();
        reordered.tables.get_mut("config").unwrap().columns.reverse();
        let changes = diff(&base(), &reordered);
        assert_eq!(changes.len(), 2);
        assert!(changes.iter().all(|c| c.class == Class::DataLosing && c.detail.starts_with("moved")));

        let mut removed = base();
        removed.tables.get_mut("config").unwrap().columns.pop();
        assert_eq!(only(&diff(&base(), &removed)).detail, "removed (String)");

        let mut system = base();
        system.tables.get_mut("config").unwrap().table_type = "System".into();
        assert_eq!(only(&diff(&base(), &system)).class, Class::DataLosing);
    }

    #[test]
    fn reducer_changes_break_clients() {
        let mut removed = base();
        removed.reducers.remove("publish");
        let c = only(&diff(&base(), &removed)).clone();
        assert_eq!((c.class, c.breaks_clients, c.subject), (Class::ClientBreaking, true, Subject::Reducer));

        let mut retyped = base();
        retyped.reducers.get_mut("publish").unwrap().params.push(col("seq", u64t()));
        assert_eq!(only(&diff(&base(), &retyped)).detail, "parameters changed: (stream_id: String) -> (stream_id: String, seq: u64)");

        let mut renamed = base();
        renamed.reducers.get_mut("publish").unwrap().params[0].name = "stream".into();
        assert_eq!(only(&diff(&base(), &renamed)).class, Class::ClientBreaking);

        let mut lifecycle = base();
        lifecycle.reducers.get_mut("publish").unwrap().lifecycle = Some("OnConnect".into());
        assert_eq!(only(&diff(&base(), &lifecycle)).detail, "lifecycle changed: callable -> OnConnect");
    }

    #[test]
    fn visibility_changes_either_way_break_clients() {
        let mut private = base();
        private.tables.get_mut("stream").unwrap().access = "Private".into();
        assert_eq!(only(&diff(&base(), &private)).subject, Subject::Access);
        assert_eq!(only(&diff(&private, &base())).class, Class::ClientBreaking);

        let mut no_rule = base();
        no_rule.rls.clear();
        let c = only(&diff(&base(), &no_rule)).clone();
        assert_eq!((c.class, c.subject), (Class::ClientBreaking, Subject::Rls));
        assert!(c.detail.starts_with("removed"));
        assert!(only(&diff(&no_rule, &base())).detail.starts_with("added"));

        // The same rules in another order are no change (the server lists them unordered).
        let mut two = base();
        two.rls.push("SELECT * FROM config WHERE 1 = 0".into());
        let mut swapped = two.clone();
        swapped.rls.reverse();
        assert!(diff(&two, &swapped).is_empty());
    }

    #[test]
    fn indexes_and_constraints_follow_the_auto_migrator() {
        let mut dropped = base();
        dropped.tables.get_mut("stream").unwrap().indexes.clear();
        assert_eq!(only(&diff(&base(), &dropped)).class, Class::ClientBreaking);

        let mut accessor = base();
        accessor.tables.get_mut("stream").unwrap().indexes[0].accessor = Some("by_id".into());
        let c = only(&diff(&base(), &accessor)).clone();
        assert_eq!((c.class, c.breaks_clients), (Class::DataLosing, true));

        let mut algorithm = base();
        algorithm.tables.get_mut("stream").unwrap().indexes[0].algorithm = json!({"Hash": [0]});
        assert_eq!(only(&diff(&base(), &algorithm)).class, Class::ClientBreaking);

        let mut unique = base();
        unique.tables.get_mut("config").unwrap().constraints.push(Constraint { name: "config_note_key".into(), data: json!({"Unique": {"columns": [1]}}) });
        assert_eq!(only(&diff(&base(), &unique)).class, Class::DataLosing);
        assert_eq!(only(&diff(&unique, &base())).class, Class::ClientBreaking);

        let mut changed = base();
        changed.tables.get_mut("config").unwrap().constraints[0].data = json!({"Unique": {"columns": [1]}});
        assert_eq!(only(&diff(&base(), &changed)).class, Class::DataLosing);

        let mut seq = base();
        seq.tables.get_mut("config").unwrap().sequences.clear();
        assert_eq!(only(&diff(&base(), &seq)).class, Class::Additive);

        let mut pk = base();
        pk.tables.get_mut("config").unwrap().primary_key = vec![1];
        let c = only(&diff(&base(), &pk)).clone();
        assert_eq!((c.class, c.breaks_clients), (Class::DataLosing, false));
        assert!(c.detail.starts_with("changed: (id) -> (note); 1.2.0 keeps the stored primary key"), "{}", c.detail);
    }

    #[test]
    fn schedule_changes_on_an_existing_table_need_a_clear() {
        let mut scheduled = base();
        scheduled.tables.get_mut("config").unwrap().schedule = Some(Schedule { reducer: "sweep".into(), at_column: 1 });
        let added = only(&diff(&base(), &scheduled)).clone();
        assert_eq!((added.class, added.subject, added.breaks_clients), (Class::DataLosing, Subject::Schedule, false));
        assert_eq!(only(&diff(&scheduled, &base())).class, Class::DataLosing);
        let mut retarget = scheduled.clone();
        retarget.tables.get_mut("config").unwrap().schedule = Some(Schedule { reducer: "sweep2".into(), at_column: 1 });
        assert_eq!(only(&diff(&scheduled, &retarget)).class, Class::DataLosing);
        // A new table comes with its schedule (1.2.0's AddTable creates it).
        let mut new_table = base();
        let mut tick = table("tick", false);
        tick.schedule = Some(Schedule { reducer: "sweep".into(), at_column: 1 });
        new_table.tables.insert("tick".into(), tick);
        assert_eq!(only(&diff(&base(), &new_table)).class, Class::Additive);
    }

    #[test]
    fn a_tables_rules_and_row_type_go_with_it() {
        assert_eq!(rls_table("SELECT * FROM stream WHERE owner = :sender"), Some("stream"));
        assert_eq!(rls_table("SELECT stream.* FROM stream_grant JOIN stream ON stream_grant.stream_id = stream.stream_id"), Some("stream"));
        assert_eq!(rls_table("not sql"), None);
        let mut old = base();
        old.row_types.insert("stream".into(), "Stream".into());
        let mut new = old.clone();
        new.tables.remove("stream");
        new.rls.clear();
        new.type_names.retain(|t| t != "Stream");
        new.row_types.remove("stream");
        let c = only(&diff(&old, &new)).clone();
        assert_eq!((c.subject, c.name.as_str()), (Subject::Table, "stream"));
        // ...and come with it.
        assert_eq!(only(&diff(&new, &old)).subject, Subject::Table);
    }

    #[test]
    fn exported_types() {
        let mut renamed = base();
        renamed.type_names = vec!["Config".into(), "StreamRow".into()];
        let changes = diff(&base(), &renamed);
        assert_eq!(changes.len(), 2);
        assert_eq!(worst(&changes), Some(Class::ClientBreaking));
    }

    #[test]
    fn renders_one_line_per_change() {
        let mut new = base();
        new.tables.remove("stream");
        let line = diff(&base(), &new)[0].to_string();
        assert!(line.starts_with("data_losing+client_breaking  table       stream: removed (public table"), "{line}");
        let json = serde_json::to_value(&diff(&base(), &new)[0]).unwrap();
        assert_eq!(json["class"], "data_losing");
        assert_eq!(json["subject"], "table");
        assert_eq!(json["breaks_clients"], true);
    }
}
