//! Paging of list operations: `maxresults` (1–25, default 25) and an opaque `$skiptoken`
//! that carries the last name returned, so pages stay correct while objects come and go.

use crate::KvError;

/// Azure's default and maximum page size for Key Vault lists.
pub const MAX_PAGE: usize = 25;

/// Parses `maxresults`.
pub fn page_size(maxresults: Option<&str>) -> Result<usize, KvError> {
    match maxresults {
        None | Some("") => Ok(MAX_PAGE),
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
            _ => Err(KvError::bad_parameter(format!(
                "maxresults must be an integer between 1 and {MAX_PAGE}."
            ))),
        },
    }
}

/// Encodes the position after `last` as a skip token.
pub fn skip_token(last: &str) -> String {
    crate::b64::encode(format!("v1:{last}").as_bytes())
}

/// Decodes a skip token into the position to continue after.
pub fn parse_skip_token(token: &str) -> Result<String, KvError> {
    crate::b64::decode(token)
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.strip_prefix("v1:").map(str::to_string))
        .ok_or_else(|| KvError::bad_parameter("The $skiptoken is not valid."))
}

/// One page of `items`, sorted by `key`, starting after `after`.
pub fn page<T, K: Ord + AsRef<str>>(
    mut items: Vec<T>,
    key: impl Fn(&T) -> K,
    after: Option<&str>,
    size: usize,
) -> (Vec<T>, Option<String>) {
    items.sort_by_key(&key);
    let start = match after {
        Some(after) => items.partition_point(|i| key(i).as_ref() <= after),
        None => 0,
    };
    let mut rest: Vec<T> = items.into_iter().skip(start).collect();
    let more = rest.len() > size;
    rest.truncate(size);
    let next = if more {
        rest.last().map(|last| skip_token(key(last).as_ref()))
    } else {
        None
    };
    (rest, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_cover_everything_once() {
        let items: Vec<String> = (0..60).map(|i| format!("k{i:02}")).collect();
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let (p, next) = page(items.clone(), |s| s.clone(), after.as_deref(), 25);
            seen.extend(p);
            match next {
                Some(t) => after = Some(parse_skip_token(&t).unwrap()),
                None => break,
            }
        }
        assert_eq!(seen, items);
    }

    #[test]
    fn sizes() {
        assert_eq!(page_size(None).unwrap(), 25);
        assert_eq!(page_size(Some("3")).unwrap(), 3);
        assert!(page_size(Some("0")).is_err());
        assert!(page_size(Some("26")).is_err());
        assert!(page_size(Some("x")).is_err());
        assert!(parse_skip_token("!!").is_err());
    }
}
