//! The data plane's route table ([`DATA_PLANE`]): the one place that says which requests a
//! vault host serves and the operation name each is audited under. The HTTP layer dispatches on
//! the [`DataPlaneRoute`] a request parses to (by the table), the audit log names requests with
//! [`DataPlaneRoute::operation_name`] and the OpenAPI description lists the table, so the three
//! cannot disagree.

/// A cryptographic operation served at `POST /keys/{name}[/{version}]/{op}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CryptoOp {
    /// `encrypt`.
    Encrypt,
    /// `decrypt`.
    Decrypt,
    /// `wrapkey`.
    WrapKey,
    /// `unwrapkey`.
    UnwrapKey,
    /// `sign`.
    Sign,
    /// `verify`.
    Verify,
}

impl CryptoOp {
    /// The operation a path segment names (any case), if any.
    pub fn from_segment(segment: &str) -> Option<Self> {
        Some(match segment.to_ascii_lowercase().as_str() {
            "encrypt" => Self::Encrypt,
            "decrypt" => Self::Decrypt,
            "wrapkey" => Self::WrapKey,
            "unwrapkey" => Self::UnwrapKey,
            "sign" => Self::Sign,
            "verify" => Self::Verify,
            _ => return None,
        })
    }

    /// The path segment, lower-cased.
    pub fn segment(self) -> &'static str {
        match self {
            Self::Encrypt => "encrypt",
            Self::Decrypt => "decrypt",
            Self::WrapKey => "wrapkey",
            Self::UnwrapKey => "unwrapkey",
            Self::Sign => "sign",
            Self::Verify => "verify",
        }
    }
}

/// One served data-plane request, with the names from its path (as sent, case kept).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataPlaneRoute<'a> {
    /// `GET /keys`.
    KeyList,
    /// `POST /keys/restore`.
    KeyRestore,
    /// `POST /keys/{name}/create`.
    KeyCreate(&'a str),
    /// `PUT /keys/{name}`.
    KeyImport(&'a str),
    /// `DELETE /keys/{name}`.
    KeyDelete(&'a str),
    /// `GET /keys/{name}[/{version}]`.
    KeyGet(&'a str, Option<&'a str>),
    /// `PATCH /keys/{name}[/{version}]`.
    KeyUpdate(&'a str, Option<&'a str>),
    /// `GET /keys/{name}/versions`.
    KeyListVersions(&'a str),
    /// `POST /keys/{name}/backup`.
    KeyBackup(&'a str),
    /// `POST /keys/{name}/rotate`.
    KeyRotate(&'a str),
    /// `GET /keys/{name}/rotationpolicy`.
    KeyGetRotationPolicy(&'a str),
    /// `PUT /keys/{name}/rotationpolicy`.
    KeySetRotationPolicy(&'a str),
    /// `POST /keys/{name}[/{version}]/{op}`.
    KeyCrypto(&'a str, Option<&'a str>, CryptoOp),
    /// `GET /deletedkeys`.
    KeyListDeleted,
    /// `GET /deletedkeys/{name}`.
    KeyGetDeleted(&'a str),
    /// `DELETE /deletedkeys/{name}`.
    KeyPurge(&'a str),
    /// `POST /deletedkeys/{name}/recover`.
    KeyRecover(&'a str),
    /// `POST /rng`.
    RandomGet,
    /// `GET /secrets`.
    SecretList,
    /// `POST /secrets/restore`.
    SecretRestore,
    /// `PUT /secrets/{name}`.
    SecretSet(&'a str),
    /// `DELETE /secrets/{name}`.
    SecretDelete(&'a str),
    /// `GET /secrets/{name}[/{version}]`.
    SecretGet(&'a str, Option<&'a str>),
    /// `PATCH /secrets/{name}[/{version}]`.
    SecretUpdate(&'a str, Option<&'a str>),
    /// `GET /secrets/{name}/versions`.
    SecretListVersions(&'a str),
    /// `POST /secrets/{name}/backup`.
    SecretBackup(&'a str),
    /// `GET /deletedsecrets`.
    SecretListDeleted,
    /// `GET /deletedsecrets/{name}`.
    SecretGetDeleted(&'a str),
    /// `DELETE /deletedsecrets/{name}`.
    SecretPurge(&'a str),
    /// `POST /deletedsecrets/{name}/recover`.
    SecretRecover(&'a str),
}

use crate::route_table::Route;
pub use crate::route_table::RouteMiss;

/// The query parameters of the data plane's lists.
const LIST_PARAMS: &[crate::route_table::Param] = &[crate::route_table::Param::query(
    "maxresults",
    "At most this many items in one page (1 to 25).",
)];

/// The data plane's routes (a vault host's, `https://{vault}.{suffix}`): what
/// [`DataPlaneRoute::parse`] matches, in the order it tries them.
#[rustfmt::skip]
pub static DATA_PLANE: &[Route] = &[
    Route::data("GET", "/keys", "KeyList", "Lists the keys of the vault.").params(LIST_PARAMS),
    Route::data("POST", "/keys/restore", "KeyRestore", "Restores a backed-up key."),
    Route::data("POST", "/keys/{keyName}/create", "KeyCreate", "Creates a key, or a new version of it."),
    Route::data("PUT", "/keys/{keyName}", "KeyImport", "Imports a key, or a new version of it."),
    Route::data("DELETE", "/keys/{keyName}", "KeyDelete", "Deletes a key (soft delete)."),
    Route::data("GET", "/keys/{keyName}", "KeyGet", "Gets the newest version of a key."),
    Route::data("PATCH", "/keys/{keyName}", "KeyUpdate", "Updates the newest version of a key."),
    Route::data("GET", "/keys/{keyName}/versions", "KeyListVersions", "Lists the versions of a key.").params(LIST_PARAMS),
    Route::data("POST", "/keys/{keyName}/backup", "KeyBackup", "Backs a key up (every version)."),
    Route::data("POST", "/keys/{keyName}/rotate", "KeyRotate", "Creates a new version of a key by its rotation policy."),
    Route::data("GET", "/keys/{keyName}/rotationpolicy", "KeyGetRotationPolicy", "Gets a key's rotation policy."),
    Route::data("PUT", "/keys/{keyName}/rotationpolicy", "KeySetRotationPolicy", "Sets a key's rotation policy."),
    Route::data("POST", "/keys/{keyName}/encrypt", "KeyEncrypt", "Encrypts with the newest version of a key."),
    Route::data("POST", "/keys/{keyName}/decrypt", "KeyDecrypt", "Decrypts with the newest version of a key."),
    Route::data("POST", "/keys/{keyName}/wrapkey", "KeyWrap", "Wraps a key with the newest version of a key."),
    Route::data("POST", "/keys/{keyName}/unwrapkey", "KeyUnwrap", "Unwraps a key with the newest version of a key."),
    Route::data("POST", "/keys/{keyName}/sign", "KeySign", "Signs a digest with the newest version of a key."),
    Route::data("POST", "/keys/{keyName}/verify", "KeyVerify", "Verifies a signature with the newest version of a key."),
    Route::data("GET", "/keys/{keyName}/{keyVersion}", "KeyGet", "Gets a version of a key."),
    Route::data("PATCH", "/keys/{keyName}/{keyVersion}", "KeyUpdate", "Updates a version of a key."),
    Route::data("POST", "/keys/{keyName}/{keyVersion}/encrypt", "KeyEncrypt", "Encrypts with a version of a key."),
    Route::data("POST", "/keys/{keyName}/{keyVersion}/decrypt", "KeyDecrypt", "Decrypts with a version of a key."),
    Route::data("POST", "/keys/{keyName}/{keyVersion}/wrapkey", "KeyWrap", "Wraps a key with a version of a key."),
    Route::data("POST", "/keys/{keyName}/{keyVersion}/unwrapkey", "KeyUnwrap", "Unwraps a key with a version of a key."),
    Route::data("POST", "/keys/{keyName}/{keyVersion}/sign", "KeySign", "Signs a digest with a version of a key."),
    Route::data("POST", "/keys/{keyName}/{keyVersion}/verify", "KeyVerify", "Verifies a signature with a version of a key."),
    Route::data("GET", "/deletedkeys", "KeyListDeleted", "Lists the deleted keys of the vault.").params(LIST_PARAMS),
    Route::data("GET", "/deletedkeys/{keyName}", "KeyGetDeleted", "Gets a deleted key."),
    Route::data("DELETE", "/deletedkeys/{keyName}", "KeyPurge", "Purges a deleted key."),
    Route::data("POST", "/deletedkeys/{keyName}/recover", "KeyRecover", "Recovers a deleted key."),
    Route::data("POST", "/rng", "RandomGet", "Random bytes from the vault's generator."),
    Route::data("GET", "/secrets", "SecretList", "Lists the secrets of the vault.").params(LIST_PARAMS),
    Route::data("POST", "/secrets/restore", "SecretRestore", "Restores a backed-up secret."),
    Route::data("PUT", "/secrets/{secretName}", "SecretSet", "Sets a secret (a new version)."),
    Route::data("DELETE", "/secrets/{secretName}", "SecretDelete", "Deletes a secret (soft delete)."),
    Route::data("GET", "/secrets/{secretName}", "SecretGet", "Gets the newest version of a secret."),
    Route::data("PATCH", "/secrets/{secretName}", "SecretUpdate", "Updates the newest version of a secret."),
    Route::data("GET", "/secrets/{secretName}/versions", "SecretListVersions", "Lists the versions of a secret.").params(LIST_PARAMS),
    Route::data("POST", "/secrets/{secretName}/backup", "SecretBackup", "Backs a secret up (every version)."),
    Route::data("GET", "/secrets/{secretName}/{secretVersion}", "SecretGet", "Gets a version of a secret."),
    Route::data("PATCH", "/secrets/{secretName}/{secretVersion}", "SecretUpdate", "Updates a version of a secret."),
    Route::data("GET", "/deletedsecrets", "SecretListDeleted", "Lists the deleted secrets of the vault.").params(LIST_PARAMS),
    Route::data("GET", "/deletedsecrets/{secretName}", "SecretGetDeleted", "Gets a deleted secret."),
    Route::data("DELETE", "/deletedsecrets/{secretName}", "SecretPurge", "Purges a deleted secret."),
    Route::data("POST", "/deletedsecrets/{secretName}/recover", "SecretRecover", "Recovers a deleted secret."),
];

impl<'a> DataPlaneRoute<'a> {
    /// The route of `method path` (`path` as received, with its leading slash; one trailing
    /// slash is ignored): the first of [`DATA_PLANE`] that serves it.
    ///
    /// # Errors
    /// [`RouteMiss`] when nothing is served there.
    pub fn parse(method: &str, path: &'a str) -> Result<Self, RouteMiss> {
        use DataPlaneRoute as R;
        let mut segs: Vec<&'a str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
        if segs.len() > 1 && segs.last() == Some(&"") {
            segs.pop();
        }
        let (route, caps) = crate::route_table::find(DATA_PLANE, method, &segs)?;
        let get = |name: &str| caps.get(name, &segs);
        // Every route has its name parameter (the table's own test checks it).
        let name = get("keyName")
            .or_else(|| get("secretName"))
            .unwrap_or_default();
        let version = get("keyVersion").or_else(|| get("secretVersion"));
        let crypto = |op| R::KeyCrypto(name, version, op);
        Ok(match route.operation {
            "KeyList" => R::KeyList,
            "KeyRestore" => R::KeyRestore,
            "KeyCreate" => R::KeyCreate(name),
            "KeyImport" => R::KeyImport(name),
            "KeyDelete" => R::KeyDelete(name),
            "KeyGet" => R::KeyGet(name, version),
            "KeyUpdate" => R::KeyUpdate(name, version),
            "KeyListVersions" => R::KeyListVersions(name),
            "KeyBackup" => R::KeyBackup(name),
            "KeyRotate" => R::KeyRotate(name),
            "KeyGetRotationPolicy" => R::KeyGetRotationPolicy(name),
            "KeySetRotationPolicy" => R::KeySetRotationPolicy(name),
            "KeyEncrypt" => crypto(CryptoOp::Encrypt),
            "KeyDecrypt" => crypto(CryptoOp::Decrypt),
            "KeyWrap" => crypto(CryptoOp::WrapKey),
            "KeyUnwrap" => crypto(CryptoOp::UnwrapKey),
            "KeySign" => crypto(CryptoOp::Sign),
            "KeyVerify" => crypto(CryptoOp::Verify),
            "KeyListDeleted" => R::KeyListDeleted,
            "KeyGetDeleted" => R::KeyGetDeleted(name),
            "KeyPurge" => R::KeyPurge(name),
            "KeyRecover" => R::KeyRecover(name),
            "RandomGet" => R::RandomGet,
            "SecretList" => R::SecretList,
            "SecretRestore" => R::SecretRestore,
            "SecretSet" => R::SecretSet(name),
            "SecretDelete" => R::SecretDelete(name),
            "SecretGet" => R::SecretGet(name, version),
            "SecretUpdate" => R::SecretUpdate(name, version),
            "SecretListVersions" => R::SecretListVersions(name),
            "SecretBackup" => R::SecretBackup(name),
            "SecretListDeleted" => R::SecretListDeleted,
            "SecretGetDeleted" => R::SecretGetDeleted(name),
            "SecretPurge" => R::SecretPurge(name),
            "SecretRecover" => R::SecretRecover(name),
            // A table entry this match does not know: a test fails on it, a request 404s.
            _ => return Err(RouteMiss::NotFound),
        })
    }

    /// The operation name of this route in the audit log (Azure's `operationName`).
    pub fn operation_name(&self) -> &'static str {
        use DataPlaneRoute as R;
        match self {
            R::KeyList => "KeyList",
            R::KeyRestore => "KeyRestore",
            R::KeyCreate(_) => "KeyCreate",
            R::KeyImport(_) => "KeyImport",
            R::KeyDelete(_) => "KeyDelete",
            R::KeyGet(..) => "KeyGet",
            R::KeyUpdate(..) => "KeyUpdate",
            R::KeyListVersions(_) => "KeyListVersions",
            R::KeyBackup(_) => "KeyBackup",
            R::KeyRotate(_) => "KeyRotate",
            R::KeyGetRotationPolicy(_) => "KeyGetRotationPolicy",
            R::KeySetRotationPolicy(_) => "KeySetRotationPolicy",
            R::KeyCrypto(_, _, op) => match op {
                CryptoOp::Encrypt => "KeyEncrypt",
                CryptoOp::Decrypt => "KeyDecrypt",
                CryptoOp::WrapKey => "KeyWrap",
                CryptoOp::UnwrapKey => "KeyUnwrap",
                CryptoOp::Sign => "KeySign",
                CryptoOp::Verify => "KeyVerify",
            },
            R::KeyListDeleted => "KeyListDeleted",
            R::KeyGetDeleted(_) => "KeyGetDeleted",
            R::KeyPurge(_) => "KeyPurge",
            R::KeyRecover(_) => "KeyRecover",
            R::RandomGet => "RandomGet",
            R::SecretList => "SecretList",
            R::SecretRestore => "SecretRestore",
            R::SecretSet(_) => "SecretSet",
            R::SecretDelete(_) => "SecretDelete",
            R::SecretGet(..) => "SecretGet",
            R::SecretUpdate(..) => "SecretUpdate",
            R::SecretListVersions(_) => "SecretListVersions",
            R::SecretBackup(_) => "SecretBackup",
            R::SecretListDeleted => "SecretListDeleted",
            R::SecretGetDeleted(_) => "SecretGetDeleted",
            R::SecretPurge(_) => "SecretPurge",
            R::SecretRecover(_) => "SecretRecover",
        }
    }
}

/// What a route does to stored state, which decides whether a read-only node serves it
/// (`kagi server --read-only`: reads and cryptographic operations are served, writes answer
/// 503).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteClass {
    /// Reads stored state only (gets, lists, backups of an object).
    Read,
    /// A cryptographic operation with a stored key (or the random generator): reads only.
    Crypto,
    /// Changes stored state (create, import, update, rotate, delete, recover, purge, restore, set).
    Write,
}

impl RouteClass {
    /// Whether a read-only node serves routes of this class.
    pub fn served_read_only(self) -> bool {
        !matches!(self, Self::Write)
    }
}

impl DataPlaneRoute<'_> {
    /// The class of this route. The match is exhaustive on purpose: a new route does not
    /// compile until it is classified here.
    pub fn class(&self) -> RouteClass {
        use DataPlaneRoute as R;
        use RouteClass::{Crypto, Read, Write};
        match self {
            R::KeyList
            | R::KeyGet(..)
            | R::KeyListVersions(_)
            | R::KeyBackup(_)
            | R::KeyGetRotationPolicy(_)
            | R::KeyListDeleted
            | R::KeyGetDeleted(_)
            | R::SecretList
            | R::SecretGet(..)
            | R::SecretListVersions(_)
            | R::SecretBackup(_)
            | R::SecretListDeleted
            | R::SecretGetDeleted(_) => Read,
            R::KeyCrypto(..) | R::RandomGet => Crypto,
            R::KeyRestore
            | R::KeyCreate(_)
            | R::KeyImport(_)
            | R::KeyDelete(_)
            | R::KeyUpdate(..)
            | R::KeyRotate(_)
            | R::KeySetRotationPolicy(_)
            | R::KeyPurge(_)
            | R::KeyRecover(_)
            | R::SecretRestore
            | R::SecretSet(_)
            | R::SecretDelete(_)
            | R::SecretUpdate(..)
            | R::SecretPurge(_)
            | R::SecretRecover(_) => Write,
        }
    }
}

/// The audit name of any data-plane request: its route's, or `UnknownOperation`.
pub fn data_plane_operation(method: &str, path: &str) -> &'static str {
    DataPlaneRoute::parse(method, path).map_or("UnknownOperation", |r| r.operation_name())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_names() {
        use DataPlaneRoute as R;
        let cases: &[(&str, &str, Result<R<'_>, RouteMiss>, &str)] = &[
            ("GET", "/keys", Ok(R::KeyList), "KeyList"),
            ("GET", "/keys/", Ok(R::KeyList), "KeyList"),
            (
                "POST",
                "/keys/K1/create",
                Ok(R::KeyCreate("K1")),
                "KeyCreate",
            ),
            ("GET", "/keys/k/", Ok(R::KeyGet("k", None)), "KeyGet"),
            (
                "GET",
                "/keys/k/v1",
                Ok(R::KeyGet("k", Some("v1"))),
                "KeyGet",
            ),
            (
                "POST",
                "/keys/k/WrapKey",
                Ok(R::KeyCrypto("k", None, CryptoOp::WrapKey)),
                "KeyWrap",
            ),
            (
                "post",
                "/keys/k/v/unwrapkey",
                Ok(R::KeyCrypto("k", Some("v"), CryptoOp::UnwrapKey)),
                "KeyUnwrap",
            ),
            (
                "DELETE",
                "/deletedsecrets/s",
                Ok(R::SecretPurge("s")),
                "SecretPurge",
            ),
            (
                "PATCH",
                "/secrets/s/v",
                Ok(R::SecretUpdate("s", Some("v"))),
                "SecretUpdate",
            ),
            // Not served: release (no attestation), unknown operations, other hosts' paths.
            (
                "POST",
                "/keys/k/release",
                Err(RouteMiss::MethodNotAllowed),
                "UnknownOperation",
            ),
            (
                "POST",
                "/keys/k/v/release",
                Err(RouteMiss::NotFound),
                "UnknownOperation",
            ),
            (
                "POST",
                "/keys",
                Err(RouteMiss::MethodNotAllowed),
                "UnknownOperation",
            ),
            (
                "POST",
                "/keys/k",
                Err(RouteMiss::MethodNotAllowed),
                "UnknownOperation",
            ),
            (
                "PUT",
                "/rng",
                Err(RouteMiss::MethodNotAllowed),
                "UnknownOperation",
            ),
            (
                "PUT",
                "/secrets",
                Err(RouteMiss::MethodNotAllowed),
                "UnknownOperation",
            ),
            (
                "GET",
                "/certificates",
                Err(RouteMiss::NotFound),
                "UnknownOperation",
            ),
        ];
        for (method, path, route, name) in cases {
            assert_eq!(
                &DataPlaneRoute::parse(method, path),
                route,
                "{method} {path}"
            );
            assert_eq!(data_plane_operation(method, path), *name, "{method} {path}");
        }
    }

    /// One request for every route of the table, with the class it must have. The match
    /// below is exhaustive, so a new route fails to compile here until it is listed (and its
    /// class checked) too.
    #[test]
    fn every_route_is_classified() {
        use DataPlaneRoute as R;
        use RouteClass::{Crypto, Read, Write};
        let cases: &[(&str, &str, RouteClass)] = &[
            ("GET", "/keys", Read),
            ("POST", "/keys/restore", Write),
            ("POST", "/keys/k/create", Write),
            ("PUT", "/keys/k", Write),
            ("DELETE", "/keys/k", Write),
            ("GET", "/keys/k/v", Read),
            ("PATCH", "/keys/k/v", Write),
            ("GET", "/keys/k/versions", Read),
            ("POST", "/keys/k/backup", Read),
            ("POST", "/keys/k/rotate", Write),
            ("GET", "/keys/k/rotationpolicy", Read),
            ("PUT", "/keys/k/rotationpolicy", Write),
            ("POST", "/keys/k/v/wrapkey", Crypto),
            ("GET", "/deletedkeys", Read),
            ("GET", "/deletedkeys/k", Read),
            ("DELETE", "/deletedkeys/k", Write),
            ("POST", "/deletedkeys/k/recover", Write),
            ("POST", "/rng", Crypto),
            ("GET", "/secrets", Read),
            ("POST", "/secrets/restore", Write),
            ("PUT", "/secrets/s", Write),
            ("DELETE", "/secrets/s", Write),
            ("GET", "/secrets/s", Read),
            ("PATCH", "/secrets/s", Write),
            ("GET", "/secrets/s/versions", Read),
            ("POST", "/secrets/s/backup", Read),
            ("GET", "/deletedsecrets", Read),
            ("GET", "/deletedsecrets/s", Read),
            ("DELETE", "/deletedsecrets/s", Write),
            ("POST", "/deletedsecrets/s/recover", Write),
        ];
        let mut seen = std::collections::BTreeSet::new();
        for (method, path, class) in cases {
            let route = DataPlaneRoute::parse(method, path).expect(path);
            assert_eq!(route.class(), *class, "{method} {path}");
            assert_eq!(class.served_read_only(), *class != Write);
            // Exhaustive: adding a variant breaks this match until the table above has it.
            let variant = match route {
                R::KeyList => 0,
                R::KeyRestore => 1,
                R::KeyCreate(_) => 2,
                R::KeyImport(_) => 3,
                R::KeyDelete(_) => 4,
                R::KeyGet(..) => 5,
                R::KeyUpdate(..) => 6,
                R::KeyListVersions(_) => 7,
                R::KeyBackup(_) => 8,
                R::KeyRotate(_) => 9,
                R::KeyGetRotationPolicy(_) => 10,
                R::KeySetRotationPolicy(_) => 11,
                R::KeyCrypto(..) => 12,
                R::KeyListDeleted => 13,
                R::KeyGetDeleted(_) => 14,
                R::KeyPurge(_) => 15,
                R::KeyRecover(_) => 16,
                R::RandomGet => 17,
                R::SecretList => 18,
                R::SecretRestore => 19,
                R::SecretSet(_) => 20,
                R::SecretDelete(_) => 21,
                R::SecretGet(..) => 22,
                R::SecretUpdate(..) => 23,
                R::SecretListVersions(_) => 24,
                R::SecretBackup(_) => 25,
                R::SecretListDeleted => 26,
                R::SecretGetDeleted(_) => 27,
                R::SecretPurge(_) => 28,
                R::SecretRecover(_) => 29,
            };
            seen.insert(variant);
        }
        assert_eq!(seen.len(), 30, "every route has a case above");
        for op in [
            "encrypt",
            "decrypt",
            "wrapkey",
            "unwrapkey",
            "sign",
            "verify",
        ] {
            let path = format!("/keys/k/{op}");
            let route = DataPlaneRoute::parse("POST", &path).expect("crypto route");
            assert_eq!(route.class(), Crypto, "{path}");
        }
    }

    /// Every route of the table parses (from its template filled in) to a route with the
    /// table's operation name: none is shadowed by an earlier one or unknown to `parse`.
    #[test]
    fn every_table_route_parses_to_itself() {
        for route in DATA_PLANE {
            let path = crate::route_table::fill(route, |n| format!("{n}1"));
            let parsed = DataPlaneRoute::parse(route.method, &path).expect(route.path);
            assert_eq!(parsed.operation_name(), route.operation, "{path}");
        }
    }

    #[test]
    fn crypto_segments_round_trip() {
        for op in [
            CryptoOp::Encrypt,
            CryptoOp::Decrypt,
            CryptoOp::WrapKey,
            CryptoOp::UnwrapKey,
            CryptoOp::Sign,
            CryptoOp::Verify,
        ] {
            assert_eq!(CryptoOp::from_segment(op.segment()), Some(op));
            assert_eq!(
                CryptoOp::from_segment(&op.segment().to_ascii_uppercase()),
                Some(op)
            );
        }
        assert_eq!(CryptoOp::from_segment("release"), None);
    }
}
