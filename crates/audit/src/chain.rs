//! The hash chain: canonical JSON, record hashes and links.
//!
//! A line is the canonical JSON of the record with `category`, `seq`, `prevHash` and `hash`.
//! `hash` is the SHA-256 (hex) of the canonical JSON of the same object without `hash`;
//! `prevHash` is the SHA-256 (hex) of the previous line's bytes (without its newline), or
//! [`GENESIS_HASH`] for the first record. Canonical JSON: object keys sorted by their bytes,
//! no whitespace, strings escaped as `serde_json` escapes them. It is computed here rather
//! than relying on the order of `serde_json::Map`, which `preserve_order` would change.

use serde_json::Value;

use crate::record::AuditRecord;

/// `prevHash` of the first record: 64 zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The `category` of every record.
pub(crate) const CATEGORY: &str = "AuditEvent";

/// SHA-256 of `data`, lower-case hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(kagi_crypto::digest(
        kagi_crypto::DigestAlgorithm::Sha256,
        data,
    ))
}

/// The canonical JSON text of a value: keys sorted, no whitespace.
pub fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (k, val)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(k, out);
                out.push(':');
                write_canonical(val, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::String(s) => write_string(s, out),
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
    }
}

fn write_string(s: &str, out: &mut String) {
    // Serializing a &str cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| String::from("\"\"")));
}

/// Builds the line (without newline) for `record` as number `seq` after `prev_hash`.
pub(crate) fn seal_line(
    record: &AuditRecord,
    seq: u64,
    prev_hash: &str,
) -> Result<String, serde_json::Error> {
    let mut v = serde_json::to_value(record)?;
    let Some(obj) = v.as_object_mut() else {
        return Err(serde::ser::Error::custom("a record is not a JSON object"));
    };
    obj.insert("category".into(), Value::from(CATEGORY));
    obj.insert("seq".into(), Value::from(seq));
    obj.insert("prevHash".into(), Value::from(prev_hash));
    let hash = sha256_hex(canonical_json(&v).as_bytes());
    if let Some(obj) = v.as_object_mut() {
        obj.insert("hash".into(), Value::from(hash));
    }
    Ok(canonical_json(&v))
}

/// What a line says about its place in the chain.
#[derive(Debug)]
pub(crate) struct Link {
    pub(crate) seq: u64,
    pub(crate) prev_hash: String,
    pub(crate) value: Value,
}

/// Checks one line on its own: JSON object in canonical form, with `seq`, `prevHash` and a
/// `hash` that matches the rest. Returns the link, or why the line is bad.
pub(crate) fn check_line(line: &str) -> Result<Link, String> {
    let mut v: Value =
        serde_json::from_str(line).map_err(|_| "the line is not valid JSON".to_string())?;
    let Some(obj) = v.as_object_mut() else {
        return Err("the line is not a JSON object".into());
    };
    let Some(Value::String(hash)) = obj.remove("hash") else {
        return Err("the record has no hash".into());
    };
    let seq = obj
        .get("seq")
        .and_then(Value::as_u64)
        .ok_or("the record has no seq")?;
    let prev_hash = obj
        .get("prevHash")
        .and_then(Value::as_str)
        .ok_or("the record has no prevHash")?
        .to_string();
    if sha256_hex(canonical_json(&v).as_bytes()) != hash {
        return Err("the record's hash does not match its content".into());
    }
    if let Some(obj) = v.as_object_mut() {
        obj.insert("hash".into(), Value::from(hash));
    }
    if canonical_json(&v) != line {
        return Err("the line is not in canonical form".into());
    }
    Ok(Link {
        seq,
        prev_hash,
        value: v,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_sorts_keys_at_every_depth() {
        let v = json!({"b": 1, "a": {"d": [true, null, "x\"y"], "c": -2}, "A": "é"});
        assert_eq!(
            canonical_json(&v),
            r#"{"A":"é","a":{"c":-2,"d":[true,null,"x\"y"]},"b":1}"#
        );
    }

    #[test]
    fn sha256_known_answer() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
