//! The routes this server serves: the platform's tables (the management host's,
//! [`kagi_core::management_routes::MANAGEMENT`], and the data plane's,
//! [`kagi_core::routes::DATA_PLANE`]) and those of its registered storage services
//! ([`kagi_host::ResourceProvider::routes`]). The management router serves a request only when
//! it matches one of them ([`find_management`]), the audit log names requests by them, and
//! `GET /openapi.json` describes exactly them ([`openapi_document`]).

use std::sync::Arc;

use kagi_core::management_routes::MANAGEMENT;
use kagi_core::openapi::DocumentInfo;
use kagi_core::route_table::{self, Route, RouteMiss};
use kagi_host::ResourceProvider;

use crate::Services;

/// A management request's route, and the storage service whose table holds it (`None`: the
/// platform's own).
#[derive(Clone, Debug)]
pub(crate) struct Found {
    /// The route.
    pub(crate) route: &'static Route,
    /// Its storage service, if it is one's.
    pub(crate) provider: Option<Arc<dyn ResourceProvider>>,
}

/// The segments of a management request's path (leading and trailing slashes ignored).
pub(crate) fn management_segments(path: &str) -> Vec<&str> {
    path.trim_matches('/').split('/').collect()
}

/// The route of a management request: the platform's first, then the registered storage
/// services' in their order.
///
/// # Errors
/// [`RouteMiss`]: 405 when some table has the path with other methods, 404 when none has it.
pub(crate) fn find_management(
    services: Option<&Services>,
    method: &str,
    segs: &[&str],
) -> Result<Found, RouteMiss> {
    let mut miss = match route_table::find(MANAGEMENT, method, segs) {
        Ok((route, _)) => {
            return Ok(Found {
                route,
                provider: None,
            });
        }
        Err(miss) => miss,
    };
    for provider in services.map(Services::providers).unwrap_or_default() {
        match route_table::find(provider.routes(), method, segs) {
            Ok((route, _)) => {
                return Ok(Found {
                    route,
                    provider: Some(provider),
                });
            }
            Err(RouteMiss::MethodNotAllowed) => miss = RouteMiss::MethodNotAllowed,
            Err(RouteMiss::NotFound) => {}
        }
    }
    Err(miss)
}

/// The methods served at a management path (`GET, PUT`): a 405's `Allow`.
pub(crate) fn allowed_management(services: Option<&Services>, segs: &[&str]) -> String {
    let providers = services.map(Services::providers).unwrap_or_default();
    let routes = MANAGEMENT
        .iter()
        .chain(providers.iter().flat_map(|p| p.routes().iter()));
    route_table::allowed_methods(routes, segs).join(", ")
}

/// The OpenAPI description of a server at `https://{dns_suffix}:{port}` running the storage
/// services whose route tables are `provider_routes`: the management host's routes, the
/// services', then the data plane's.
pub fn openapi_document(
    provider_routes: &[&'static [Route]],
    dns_suffix: &str,
    port: u16,
) -> serde_json::Value {
    let routes = MANAGEMENT
        .iter()
        .chain(provider_routes.iter().flat_map(|r| r.iter()))
        .chain(kagi_core::routes::DATA_PLANE);
    let info = DocumentInfo::for_server(env!("CARGO_PKG_VERSION"), dns_suffix, port);
    kagi_core::openapi::document(routes, &info)
}

/// The description `GET /openapi.json` answers: this server's routes (the test clock's only
/// under `kagi server --test-clock`, the only route served on a condition).
pub(crate) fn served_document(
    platform: &kagi_vault::Platform,
    services: Option<&Services>,
) -> serde_json::Value {
    let tables: Vec<&'static [Route]> = services
        .map(Services::providers)
        .unwrap_or_default()
        .iter()
        .map(|p| p.routes())
        .collect();
    let config = platform.config();
    let mut doc = openapi_document(&tables, &config.dns_suffix, config.port);
    if !platform.has_test_clock()
        && let Some(paths) = doc["paths"].as_object_mut()
    {
        paths.remove("/kagi/test/clock");
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The audit log's names of management requests, as the tables give them.
    #[test]
    fn management_names() {
        let vault = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/v";
        let purge =
            "/subscriptions/s/providers/Microsoft.KeyVault/locations/l/deletedVaults/v/purge";
        let assignment = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/v/providers/Microsoft.Authorization/roleAssignments/g";
        let identity = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id1";
        let cases = [
            ("POST", "/t/oauth2/v2.0/token", "Authentication"),
            ("GET", "/msi/token", "Authentication"),
            (
                "GET",
                "/imds/x/metadata/identity/oauth2/token",
                "Authentication",
            ),
            (
                "GET",
                "/t/v2.0/.well-known/openid-configuration",
                "OpenIdConfigurationGet",
            ),
            ("GET", "/t/discovery/v2.0/keys", "JwksGet"),
            ("PUT", vault, "VaultPut"),
            ("PATCH", vault, "VaultPatch"),
            ("GET", vault, "VaultGet"),
            ("DELETE", vault, "VaultDelete"),
            (
                "GET",
                "/subscriptions/s/providers/microsoft.keyvault/VAULTS",
                "VaultList",
            ),
            (
                "GET",
                "/subscriptions/s/providers/Microsoft.KeyVault/deletedVaults",
                "VaultListDeleted",
            ),
            ("POST", purge, "VaultPurge"),
            (
                "GET",
                "/subscriptions",
                "Microsoft.Resources/subscriptions/read",
            ),
            // Whatever the case sent, the table's name.
            (
                "PUT",
                "/subscriptions/s/resourcegroups/rg",
                "Microsoft.Resources/subscriptions/resourceGroups/write",
            ),
            (
                "DELETE",
                "/subscriptions/s/resourceGroups/rg",
                "Microsoft.Resources/subscriptions/resourceGroups/delete",
            ),
            (
                "PUT",
                identity,
                "Microsoft.ManagedIdentity/userAssignedIdentities/write",
            ),
            (
                "DELETE",
                assignment,
                "Microsoft.Authorization/roleAssignments/delete",
            ),
            (
                "POST",
                "/v1.0/servicePrincipals",
                "Microsoft.Graph/servicePrincipals/write",
            ),
            (
                "DELETE",
                "/v1.0/servicePrincipals/i",
                "Microsoft.Graph/servicePrincipals/delete",
            ),
            (
                "POST",
                "/v1.0/servicePrincipals/i/addPassword",
                "Microsoft.Graph/servicePrincipals/addPassword/action",
            ),
        ];
        for (m, p, want) in cases {
            let found = find_management(None, m, &management_segments(p)).expect(p);
            assert_eq!(found.route.operation, want, "{m} {p}");
            assert!(found.provider.is_none());
        }
        for (m, p) in [
            ("GET", "/"),
            ("GET", "/favicon.ico"),
            ("GET", "/metadata/identity/oauth2/token"),
            // A storage service's path, with none registered.
            ("GET", "/subscriptions/s/providers/Microsoft.Sql/servers"),
        ] {
            let miss = find_management(None, m, &management_segments(p)).unwrap_err();
            assert_eq!(miss, RouteMiss::NotFound, "{m} {p}");
        }
        let miss = find_management(None, "DELETE", &management_segments("/subscriptions"));
        assert_eq!(miss.unwrap_err(), RouteMiss::MethodNotAllowed);
        let group = management_segments("/subscriptions/s/resourceGroups/g");
        assert_eq!(allowed_management(None, &group), "PUT, GET, HEAD, DELETE");
    }
}
