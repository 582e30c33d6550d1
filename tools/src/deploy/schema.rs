//! A module's schema as SpacetimeDB 1.2.0 describes it: `RawModuleDefV9` in the
//! server's JSON encoding, from the live database (`GET /v1/database/NAME/schema?version=9`,
//! the bare object) or from a wasm file (`spacetimedb-standalone extract-schema`, the
//! same object wrapped as `{"V9": ...}`). Both are the *validated* definition turned back
//! into raw form, so generated names (indexes, constraints, sequences) agree.
//!
//! Only what the diff compares is modelled; algebraic types stay JSON values, resolved
//! through the typespace ([`Schema::resolve`]) because adding one type shifts every
//! `Ref` after it. No I/O here.

use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;

/// What went wrong reading a schema document.
#[derive(Debug, thiserror::Error)]
#[error("not a SpacetimeDB V9 module schema: {0}")]
pub struct SchemaError(String);

/// A column: its name and its type with every `Ref` resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub ty: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Index {
    pub name: String,
    pub accessor: Option<String>,
    /// e.g. `{"BTree": [1]}`.
    pub algorithm: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Constraint {
    pub name: String,
    /// e.g. `{"Unique": {"columns": [0]}}`.
    pub data: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub name: String,
    /// Everything but the name (column, start, bounds, increment).
    pub def: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub reducer: String,
    pub at_column: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub name: String,
    pub columns: Vec<Column>,
    pub primary_key: Vec<u64>,
    pub indexes: Vec<Index>,
    pub constraints: Vec<Constraint>,
    pub sequences: Vec<Sequence>,
    pub schedule: Option<Schedule>,
    /// `User` or `System`.
    pub table_type: String,
    /// `Public` or `Private`.
    pub access: String,
}

impl Table {
    pub fn is_public(&self) -> bool {
        self.access == "Public"
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Reducer {
    pub name: String,
    /// Parameters in order: name (empty when unnamed) and resolved type.
    pub params: Vec<Column>,
    /// `Init`, `OnConnect`, `OnDisconnect`, or `None` for a callable reducer.
    pub lifecycle: Option<String>,
}

/// One module's schema, keyed the way 1.2.0's auto-migration looks things up: tables,
/// reducers and exported type names by name; RLS rules by their SQL.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Schema {
    pub tables: BTreeMap<String, Table>,
    pub reducers: BTreeMap<String, Reducer>,
    /// Exported type names (`scope::Name`) the client bindings are generated with.
    pub type_names: Vec<String>,
    /// The exported type name of each table's row type, by table (they come and go
    /// with their table).
    pub row_types: BTreeMap<String, String>,
    pub rls: Vec<String>,
    pub misc_exports: Vec<Value>,
}

// The raw JSON shapes (SATS serde: options are {"some": x} / {"none": []}, enums are
// one-key objects).

#[derive(Deserialize)]
struct RawDef {
    typespace: RawTypespace,
    tables: Vec<RawTable>,
    reducers: Vec<RawReducer>,
    #[serde(default)]
    types: Vec<RawTypeDef>,
    #[serde(default)]
    misc_exports: Vec<Value>,
    #[serde(default)]
    row_level_security: Vec<RawRls>,
}

#[derive(Deserialize)]
struct RawTypespace {
    types: Vec<Value>,
}

#[derive(Deserialize)]
struct RawTable {
    name: String,
    product_type_ref: usize,
    primary_key: Vec<u64>,
    indexes: Vec<RawIndex>,
    constraints: Vec<RawConstraint>,
    sequences: Vec<Value>,
    schedule: Value,
    table_type: Value,
    table_access: Value,
}

#[derive(Deserialize)]
struct RawIndex {
    name: Value,
    accessor_name: Value,
    algorithm: Value,
}

#[derive(Deserialize)]
struct RawConstraint {
    name: Value,
    data: Value,
}

#[derive(Deserialize)]
struct RawSchedule {
    reducer_name: String,
    scheduled_at_column: u64,
}

#[derive(Deserialize)]
struct RawReducer {
    name: String,
    params: Value,
    lifecycle: Value,
}

#[derive(Deserialize)]
struct RawTypeDef {
    name: RawScopedName,
    ty: usize,
}

#[derive(Deserialize)]
struct RawScopedName {
    scope: Vec<String>,
    name: String,
}

#[derive(Deserialize)]
struct RawRls {
    sql: String,
}

/// `{"some": x}` → `Some(x)`, `{"none": []}` → `None`.
fn sats_option(value: &Value) -> Option<&Value> {
    value.get("some")
}

/// The variant name of a one-key SATS enum object, e.g. `{"User": []}` → `User`.
fn variant(value: &Value) -> Result<String, SchemaError> {
    match value.as_object() {
        Some(map) if map.len() == 1 => Ok(map.keys().next().cloned().unwrap_or_default()),
        _ => Err(SchemaError(format!("expected a one-variant object, found {value}"))),
    }
}

/// Product elements `{"elements": [{"name": {"some": n}, "algebraic_type": t}]}`.
fn elements(product: &Value) -> Result<Vec<(String, Value)>, SchemaError> {
    let items = product["elements"].as_array().ok_or_else(|| SchemaError(format!("expected product elements, found {product}")))?;
    Ok(items
        .iter()
        .map(|e| (sats_option(&e["name"]).and_then(Value::as_str).unwrap_or("").to_string(), e["algebraic_type"].clone()))
        .collect())
}

struct Typespace<'a> {
    types: &'a [Value],
}

impl Typespace<'_> {
    /// `ty` with every `{"Ref": n}` replaced by the type it names (recursively; a type
    /// that refers to itself stops at the second visit and keeps its `Ref`).
    fn resolve(&self, ty: &Value) -> Value {
        self.resolve_inner(ty, &mut Vec::new())
    }

    fn resolve_inner(&self, ty: &Value, stack: &mut Vec<u64>) -> Value {
        match ty {
            Value::Object(map) => {
                if let (1, Some(n)) = (map.len(), map.get("Ref").and_then(Value::as_u64)) {
                    let Some(target) = self.types.get(n as usize) else { return ty.clone() };
                    if stack.contains(&n) {
                        return ty.clone();
                    }
                    stack.push(n);
                    let out = self.resolve_inner(target, stack);
                    stack.pop();
                    return out;
                }
                Value::Object(map.iter().map(|(k, v)| (k.clone(), self.resolve_inner(v, stack))).collect())
            }
            Value::Array(items) => Value::Array(items.iter().map(|v| self.resolve_inner(v, stack)).collect()),
            other => other.clone(),
        }
    }
}

impl Schema {
    /// Parses either form: the bare `RawModuleDefV9` or `{"V9": ...}`.
    pub fn from_json(value: &Value) -> Result<Schema, SchemaError> {
        let body = match value.get("V9") {
            Some(inner) => inner,
            None if value.get("tables").is_some() => value,
            None => return Err(SchemaError("neither a RawModuleDefV9 nor {\"V9\": ...}".into())),
        };
        let raw: RawDef = serde_json::from_value(body.clone()).map_err(|e| SchemaError(e.to_string()))?;
        let space = Typespace { types: &raw.typespace.types };

        let mut tables = BTreeMap::new();
        for t in &raw.tables {
            let row = raw.typespace.types.get(t.product_type_ref).ok_or_else(|| SchemaError(format!("table {} names type {} outside the typespace", t.name, t.product_type_ref)))?;
            let product = row.get("Product").ok_or_else(|| SchemaError(format!("table {}'s row type is not a product", t.name)))?;
            let columns = elements(product)?.into_iter().map(|(name, ty)| Column { name, ty: space.resolve(&ty) }).collect();
            let indexes = t
                .indexes
                .iter()
                .map(|i| Index {
                    name: sats_option(&i.name).and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| format!("{}_{}", t.name, i.algorithm)),
                    accessor: sats_option(&i.accessor_name).and_then(Value::as_str).map(str::to_string),
                    algorithm: i.algorithm.clone(),
                })
                .collect();
            let constraints = t
                .constraints
                .iter()
                .map(|c| Constraint { name: sats_option(&c.name).and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| format!("{}_{}", t.name, c.data)), data: c.data.clone() })
                .collect();
            let sequences = t
                .sequences
                .iter()
                .map(|s| {
                    let mut def = s.clone();
                    let name = def.as_object_mut().and_then(|m| m.remove("name")).and_then(|n| sats_option(&n).and_then(Value::as_str).map(str::to_string));
                    Sequence { name: name.unwrap_or_else(|| format!("{}_seq_{}", t.name, def["column"])), def }
                })
                .collect();
            let schedule = match sats_option(&t.schedule) {
                Some(s) => {
                    let s: RawSchedule = serde_json::from_value(s.clone()).map_err(|e| SchemaError(format!("table {}'s schedule: {e}", t.name)))?;
                    Some(Schedule { reducer: s.reducer_name, at_column: s.scheduled_at_column })
                }
                None => None,
            };
            let table = Table {
                name: t.name.clone(),
                columns,
                primary_key: t.primary_key.clone(),
                indexes,
                constraints,
                sequences,
                schedule,
                table_type: variant(&t.table_type)?,
                access: variant(&t.table_access)?,
            };
            tables.insert(t.name.clone(), table);
        }

        let mut reducers = BTreeMap::new();
        for r in &raw.reducers {
            let params = elements(&r.params)?.into_iter().map(|(name, ty)| Column { name, ty: space.resolve(&ty) }).collect();
            let lifecycle = match sats_option(&r.lifecycle) {
                Some(l) => Some(variant(l)?),
                None => None,
            };
            reducers.insert(r.name.clone(), Reducer { name: r.name.clone(), params, lifecycle });
        }

        let scoped = |t: &RawTypeDef| t.name.scope.iter().chain(std::iter::once(&t.name.name)).cloned().collect::<Vec<_>>().join("::");
        let mut type_names: Vec<String> = raw.types.iter().map(scoped).collect();
        type_names.sort();
        let row_types = raw
            .tables
            .iter()
            .filter_map(|table| raw.types.iter().find(|t| t.ty == table.product_type_ref).map(|t| (table.name.clone(), scoped(t))))
            .collect();
        let mut rls: Vec<String> = raw.row_level_security.into_iter().map(|r| r.sql).collect();
        rls.sort();
        Ok(Schema { tables, reducers, type_names, row_types, rls, misc_exports: raw.misc_exports })
    }
}

/// A short, readable rendering of a resolved algebraic type: `u64`, `String`,
/// `Vec<u8>`, `Identity`, `Timestamp`, `Option<T>`, `{a: T, b: U}`, `(A | B)`.
pub fn type_name(ty: &Value) -> String {
    let Some((kind, inner)) = ty.as_object().and_then(|m| if m.len() == 1 { m.iter().next() } else { None }) else {
        return ty.to_string();
    };
    match kind.as_str() {
        "Array" => format!("Vec<{}>", type_name(inner)),
        "Ref" => format!("ref {inner}"),
        "Product" => {
            let Ok(fields) = elements(inner) else { return ty.to_string() };
            match fields.as_slice() {
                [(name, _)] if name == "__identity__" => "Identity".into(),
                [(name, _)] if name == "__connection_id__" => "ConnectionId".into(),
                [(name, _)] if name == "__timestamp_micros_since_unix_epoch__" => "Timestamp".into(),
                [(name, _)] if name == "__time_duration_micros__" => "TimeDuration".into(),
                _ => format!("{{{}}}", fields.iter().map(|(n, t)| format!("{n}: {}", type_name(t))).collect::<Vec<_>>().join(", ")),
            }
        }
        "Sum" => {
            let variants: Vec<(String, Value)> = inner["variants"]
                .as_array()
                .map(|vs| vs.iter().map(|v| (sats_option(&v["name"]).and_then(Value::as_str).unwrap_or("").to_string(), v["algebraic_type"].clone())).collect())
                .unwrap_or_default();
            let is_unit = |t: &Value| t.get("Product").and_then(|p| p["elements"].as_array()).is_some_and(|e| e.is_empty());
            match variants.as_slice() {
                [(some, t), (none, u)] if some == "some" && none == "none" && is_unit(u) => format!("Option<{}>", type_name(t)),
                _ => format!("({})", variants.iter().map(|(n, t)| if is_unit(t) { n.clone() } else { format!("{n}({})", type_name(t)) }).collect::<Vec<_>>().join(" | ")),
            }
        }
        "String" => "String".into(),
        "Bool" => "bool".into(),
        primitive => primitive.to_ascii_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn named(name: &str, ty: Value) -> Value {
        json!({"name": {"some": name}, "algebraic_type": ty})
    }

    #[test]
    fn reads_both_forms_and_resolves_refs() {
        let def = json!({
            "typespace": {"types": [
                {"Product": {"elements": [named("id", json!({"U64": []})), named("owner", json!({"Ref": 1}))]}},
                {"Product": {"elements": [named("__identity__", json!({"U256": []}))]}}
            ]},
            "tables": [{
                "name": "thing", "product_type_ref": 0, "primary_key": [0],
                "indexes": [{"name": {"some": "thing_id_idx_btree"}, "accessor_name": {"some": "id"}, "algorithm": {"BTree": [0]}}],
                "constraints": [{"name": {"some": "thing_id_key"}, "data": {"Unique": {"columns": [0]}}}],
                "sequences": [{"name": {"some": "thing_id_seq"}, "column": 0, "start": {"none": []}, "min_value": {"none": []}, "max_value": {"none": []}, "increment": 1}],
                "schedule": {"some": {"name": {"some": "thing_sched"}, "reducer_name": "tick", "scheduled_at_column": 1}},
                "table_type": {"User": []}, "table_access": {"Public": []}
            }],
            "reducers": [{"name": "tick", "params": {"elements": [named("arg", json!({"Ref": 0}))]}, "lifecycle": {"none": []}},
                         {"name": "init", "params": {"elements": []}, "lifecycle": {"some": {"Init": []}}}],
            "types": [{"name": {"scope": [], "name": "Thing"}, "ty": 0, "custom_ordering": true}],
            "misc_exports": [],
            "row_level_security": [{"sql": "SELECT * FROM thing WHERE owner = :sender"}]
        });
        let bare = Schema::from_json(&def).unwrap();
        let wrapped = Schema::from_json(&json!({ "V9": def })).unwrap();
        assert_eq!(bare, wrapped);
        let thing = &bare.tables["thing"];
        assert!(thing.is_public());
        assert_eq!(thing.table_type, "User");
        assert_eq!(thing.columns[1].name, "owner");
        assert_eq!(type_name(&thing.columns[1].ty), "Identity");
        assert_eq!(thing.schedule, Some(Schedule { reducer: "tick".into(), at_column: 1 }));
        assert_eq!(thing.sequences[0].name, "thing_id_seq");
        assert!(thing.sequences[0].def.get("name").is_none());
        assert_eq!(type_name(&bare.reducers["tick"].params[0].ty), "{id: u64, owner: Identity}");
        assert_eq!(bare.reducers["init"].lifecycle.as_deref(), Some("Init"));
        assert_eq!(bare.type_names, vec!["Thing".to_string()]);
        assert_eq!(bare.row_types["thing"], "Thing");
        assert_eq!(bare.rls.len(), 1);
        assert!(Schema::from_json(&json!({"hello": 1})).is_err());
    }

    #[test]
    fn names_types_readably() {
        let option_u64 = json!({"Sum": {"variants": [named("some", json!({"U64": []})), named("none", json!({"Product": {"elements": []}}))]}});
        assert_eq!(type_name(&option_u64), "Option<u64>");
        assert_eq!(type_name(&json!({"Array": {"U8": []}})), "Vec<u8>");
        assert_eq!(type_name(&json!({"String": []})), "String");
        let ts = json!({"Product": {"elements": [named("__timestamp_micros_since_unix_epoch__", json!({"I64": []}))]}});
        assert_eq!(type_name(&ts), "Timestamp");
    }
}
