//! Whether a key, as the key vault returned it, can protect data now.

use serde_json::{Value, json};

/// Why a key bundle cannot protect data now (disabled, not yet valid, expired, not RSA): the
/// inner error code and the reason; `consumer` names what needs the key ("backup vault").
pub fn key_unusable(bundle: &Value, now: i64, consumer: &str) -> Option<(&'static str, String)> {
    let kty = bundle["key"]["kty"].as_str().unwrap_or("");
    if kty != "RSA" && kty != "RSA-HSM" {
        return Some((
            "KeyTypeNotRsa",
            format!("the key is of type '{kty}'; a {consumer} needs an RSA key"),
        ));
    }
    let a = &bundle["attributes"];
    if a["enabled"] == json!(false) {
        return Some(("KeyDisabled", "the key is disabled".into()));
    }
    if let Some(nbf) = a["nbf"].as_i64()
        && now < nbf
    {
        return Some(("KeyNotYetValid", "the key is not yet valid (nbf)".into()));
    }
    if let Some(exp) = a["exp"].as_i64()
        && now >= exp
    {
        return Some(("KeyExpired", "the key has expired".into()));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usability() {
        let unusable = |v: Value, now| key_unusable(&v, now, "backup vault");
        let ok = json!({"key": {"kty": "RSA"}, "attributes": {"enabled": true}});
        assert!(unusable(ok, 0).is_none());
        let hsm = json!({"key": {"kty": "RSA-HSM"}, "attributes": {"nbf": 5}});
        assert!(unusable(hsm.clone(), 5).is_none());
        assert_eq!(unusable(hsm, 4).unwrap().0, "KeyNotYetValid");
        let ec = json!({"key": {"kty": "EC"}, "attributes": {"enabled": true}});
        let (inner, why) = unusable(ec, 0).unwrap();
        assert_eq!(inner, "KeyTypeNotRsa");
        assert!(why.ends_with("a backup vault needs an RSA key"), "{why}");
        let off = json!({"key": {"kty": "RSA"}, "attributes": {"enabled": false}});
        assert_eq!(unusable(off, 0).unwrap().0, "KeyDisabled");
        let exp = json!({"key": {"kty": "RSA"}, "attributes": {"enabled": true, "exp": 10}});
        assert_eq!(unusable(exp.clone(), 10).unwrap().0, "KeyExpired");
        assert!(unusable(exp, 9).is_none());
    }
}
