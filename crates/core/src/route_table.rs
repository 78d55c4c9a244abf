//! Route tables: every request kagi serves matches one [`Route`] of a table — the data plane's
//! ([`crate::routes::DATA_PLANE`]), the management host's
//! ([`crate::management_routes::MANAGEMENT`]) and each storage service's (its provider's
//! `routes()`). The HTTP layer serves a request only when it matches a route, the audit log
//! names it with the route's [`Route::operation`], and the OpenAPI description
//! ([`crate::openapi`]) is generated from the same tables, so the three cannot disagree.
//!
//! A path template is a list of `/`-separated segments: a literal (matched without regard to
//! ASCII case, as Azure matches paths), `{name}` (any one segment) or `{*name}` (one or more
//! segments: a scope or an object name holding slashes; at most one per template).

use std::ops::Range;

/// The host a route is served on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    /// The management host (the DNS suffix itself): token service, ARM, Graph, kagi's own.
    Management,
    /// A vault's data plane (`{vault}.{suffix}`).
    Vault,
}

/// How the caller of a route proves who it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Auth {
    /// Nobody needs to: health, discovery documents, the token endpoint itself.
    Anonymous,
    /// A bearer token from kagi's token service.
    Bearer,
    /// A workload's binding secret (the managed-identity token endpoints).
    BindingSecret,
    /// An agent's own credentials (a storage service's agents: backup agents).
    Agent,
}

/// The `api-version` query parameter a route requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiVersion {
    /// None (kagi's own routes, Graph, the token service).
    None,
    /// A Key Vault data-plane version ([`crate::api_version::check_data_plane`]).
    DataPlane,
    /// An ARM version ([`crate::api_version::check_arm`]).
    Arm,
}

/// What a route's request body holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestBody {
    /// No body.
    None,
    /// A JSON object.
    Json,
    /// A JSON object, or nothing (taken as `{}`).
    OptionalJson,
    /// An `application/x-www-form-urlencoded` form.
    Form,
    /// Bytes (`application/octet-stream`).
    Bytes,
}

/// Where a documented parameter other than a path parameter goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamIn {
    /// The query string.
    Query,
    /// A request header.
    Header,
}

/// A query or header parameter of a route (path parameters come from its template).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Param {
    /// Its name.
    pub name: &'static str,
    /// Where it goes.
    pub at: ParamIn,
    /// Whether a request without it is refused.
    pub required: bool,
    /// What it means.
    pub description: &'static str,
}

impl Param {
    /// An optional query parameter.
    pub const fn query(name: &'static str, description: &'static str) -> Self {
        Self {
            name,
            at: ParamIn::Query,
            required: false,
            description,
        }
    }

    /// An optional header.
    pub const fn header(name: &'static str, description: &'static str) -> Self {
        Self {
            name,
            at: ParamIn::Header,
            required: false,
            description,
        }
    }

    /// The same parameter, required.
    pub const fn required(self) -> Self {
        Self {
            required: true,
            ..self
        }
    }
}

/// One served request shape: host, method and path template, with what the audit log calls
/// it and what the OpenAPI description says of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// The host it is served on.
    pub host: Host,
    /// The HTTP method, upper case.
    pub method: &'static str,
    /// The path template (see the module documentation).
    pub path: &'static str,
    /// The audit log's operation name (Azure's `operationName`), also the OpenAPI
    /// `operationId` (made unique where several routes share a name).
    pub operation: &'static str,
    /// How its caller authenticates.
    pub auth: Auth,
    /// The api-version it requires.
    pub api_version: ApiVersion,
    /// Its request body.
    pub body: RequestBody,
    /// Its query and header parameters.
    pub params: &'static [Param],
    /// One line on what it does.
    pub summary: &'static str,
}

/// The body a method takes by default: JSON for `PUT` and `PATCH`, an optional JSON object for
/// `POST` (actions), none otherwise.
const fn default_body(method: &str) -> RequestBody {
    match method.as_bytes() {
        b"PUT" | b"PATCH" => RequestBody::Json,
        b"POST" => RequestBody::OptionalJson,
        _ => RequestBody::None,
    }
}

impl Route {
    /// A data-plane route of a vault host: bearer token, data-plane api-version, a JSON body
    /// for `PUT`, `PATCH` and `POST`.
    pub const fn data(
        method: &'static str,
        path: &'static str,
        operation: &'static str,
        summary: &'static str,
    ) -> Self {
        Self {
            host: Host::Vault,
            api_version: ApiVersion::DataPlane,
            // Key Vault's POSTs (create, crypto, restore) all take a JSON object.
            body: match default_body(method) {
                RequestBody::None => RequestBody::None,
                _ => RequestBody::Json,
            },
            ..Self::arm(method, path, operation, summary)
        }
    }

    /// An ARM route of the management host: bearer token, ARM api-version, the method's
    /// default body.
    pub const fn arm(
        method: &'static str,
        path: &'static str,
        operation: &'static str,
        summary: &'static str,
    ) -> Self {
        Self {
            host: Host::Management,
            method,
            path,
            operation,
            auth: Auth::Bearer,
            api_version: ApiVersion::Arm,
            body: default_body(method),
            params: &[],
            summary,
        }
    }

    /// A route of the management host without an api-version (kagi's own, Graph): bearer
    /// token, the method's default body.
    pub const fn kagi(
        method: &'static str,
        path: &'static str,
        operation: &'static str,
        summary: &'static str,
    ) -> Self {
        Self {
            api_version: ApiVersion::None,
            ..Self::arm(method, path, operation, summary)
        }
    }

    /// The same route with another authentication.
    pub const fn auth(self, auth: Auth) -> Self {
        Self { auth, ..self }
    }

    /// The same route with another body.
    pub const fn body(self, body: RequestBody) -> Self {
        Self { body, ..self }
    }

    /// The same route with these query and header parameters.
    pub const fn params(self, params: &'static [Param]) -> Self {
        Self { params, ..self }
    }

    /// The segments of its template.
    pub fn segments(&self) -> impl Iterator<Item = &'static str> + Clone {
        let path: &'static str = self.path;
        path.strip_prefix('/').unwrap_or(path).split('/')
    }

    /// The names of its path parameters, in order.
    pub fn path_params(&self) -> impl Iterator<Item = &'static str> {
        self.segments().filter_map(param_name)
    }

    /// The parameters a request's path segments (as sent, or lower-cased) give this route's
    /// template, if they fit it (same method not required).
    pub fn capture(&self, segs: &[&str]) -> Option<Captures> {
        let count = self.segments().count();
        let multi = self.segments().position(|s| s.starts_with("{*"));
        // The segments a multi-segment parameter takes beyond its first.
        let extra = match multi {
            None if segs.len() == count => 0,
            Some(_) if segs.len() >= count => segs.len() - count,
            _ => return None,
        };
        let mut caps = Captures::default();
        for (i, t) in self.segments().enumerate() {
            let (start, end) = match multi {
                Some(k) if i == k => (i, i + 1 + extra),
                Some(k) if i > k => (i + extra, i + extra + 1),
                _ => (i, i + 1),
            };
            match param_name(t) {
                Some(name) => caps.items.push((name, start..end)),
                None if t.eq_ignore_ascii_case(segs[start]) => {}
                None => return None,
            }
        }
        Some(caps)
    }
}

/// The name of a template segment that is a parameter (`{name}` or `{*name}`).
pub fn param_name(segment: &str) -> Option<&str> {
    let inner = segment.strip_prefix('{')?.strip_suffix('}')?;
    Some(inner.strip_prefix('*').unwrap_or(inner))
}

/// The path parameters of a matched request: their names and the segments they took.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Captures {
    items: Vec<(&'static str, Range<usize>)>,
}

impl Captures {
    /// The segments parameter `name` took.
    pub fn range(&self, name: &str) -> Option<Range<usize>> {
        self.items
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, r)| r.clone())
    }

    /// The one segment of `segs` parameter `name` took (`None` for a multi-segment one).
    pub fn get<'a>(&self, name: &str, segs: &[&'a str]) -> Option<&'a str> {
        let r = self.range(name)?;
        (r.len() == 1).then(|| segs.get(r.start).copied()).flatten()
    }
}

/// Why a request matches no route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteMiss {
    /// No such path (404).
    NotFound,
    /// A served path, another method (405).
    MethodNotAllowed,
}

/// The first route of `routes` (in their order) that serves `method` (any case) at `segs`,
/// with its parameters.
///
/// # Errors
/// [`RouteMiss::MethodNotAllowed`] when some route has the path but none the method,
/// [`RouteMiss::NotFound`] when none has the path.
pub fn find<'r, I>(
    routes: I,
    method: &str,
    segs: &[&str],
) -> Result<(&'r Route, Captures), RouteMiss>
where
    I: IntoIterator<Item = &'r Route>,
{
    let mut path_served = false;
    for route in routes {
        if let Some(caps) = route.capture(segs) {
            if route.method.eq_ignore_ascii_case(method) {
                return Ok((route, caps));
            }
            path_served = true;
        }
    }
    Err(if path_served {
        RouteMiss::MethodNotAllowed
    } else {
        RouteMiss::NotFound
    })
}

/// The methods `routes` serve at `segs`, each once, in the tables' order: a 405's `Allow`.
pub fn allowed_methods<'r, I>(routes: I, segs: &[&str]) -> Vec<&'static str>
where
    I: IntoIterator<Item = &'r Route>,
{
    let mut methods: Vec<&'static str> = Vec::new();
    for route in routes {
        if !methods.contains(&route.method) && route.capture(segs).is_some() {
            methods.push(route.method);
        }
    }
    methods
}

/// A path made from `route`'s template with `value(name)` for each parameter (one segment
/// each): what the tests send to check that a route is served, and what the OpenAPI examples
/// show.
pub fn fill(route: &Route, value: impl Fn(&str) -> String) -> String {
    let mut out = String::new();
    for s in route.segments() {
        out.push('/');
        match param_name(s) {
            Some(name) => out.push_str(&value(name)),
            None => out.push_str(s),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &[Route] = &[
        Route::kagi("GET", "/a/{x}", "A", ""),
        Route::kagi("POST", "/a/b", "B", ""),
        Route::kagi("GET", "/{*scope}/providers/P/things/{name}", "T", ""),
        Route::kagi("GET", "/objects/{m}/{*name}", "O", ""),
    ];

    fn segs(path: &str) -> Vec<&str> {
        path.trim_matches('/').split('/').collect()
    }

    #[test]
    fn literals_ignore_case_and_parameters_take_segments() {
        let s = segs("/A/B");
        let (r, caps) = find(ROUTES, "get", &s).unwrap();
        assert_eq!(r.operation, "A");
        assert_eq!(caps.get("x", &s), Some("B"));
        assert_eq!(find(ROUTES, "POST", &s).unwrap().0.operation, "B");
        assert_eq!(
            find(ROUTES, "DELETE", &s).unwrap_err(),
            RouteMiss::MethodNotAllowed
        );
        assert_eq!(allowed_methods(ROUTES, &s), ["GET", "POST"]);
        assert!(allowed_methods(ROUTES, &segs("/b")).is_empty());
        assert_eq!(
            find(ROUTES, "GET", &segs("/a")).unwrap_err(),
            RouteMiss::NotFound
        );
    }

    #[test]
    fn multi_segment_parameters() {
        let s = segs("/subscriptions/s/resourceGroups/g/providers/p/THINGS/t");
        let (r, caps) = find(ROUTES, "GET", &s).unwrap();
        assert_eq!(r.operation, "T");
        assert_eq!(caps.range("scope"), Some(0..4));
        assert_eq!(caps.get("scope", &s), None);
        assert_eq!(caps.get("name", &s), Some("t"));
        // A scope takes one segment at least.
        assert!(find(ROUTES, "GET", &segs("/providers/P/things/t")).is_err());
        let s = segs("/objects/m/a/b/c");
        let (r, caps) = find(ROUTES, "GET", &s).unwrap();
        assert_eq!(r.operation, "O");
        assert_eq!(caps.range("name"), Some(2..5));
        assert!(find(ROUTES, "GET", &segs("/objects/m")).is_err());
    }

    #[test]
    fn filled_templates_match_their_route() {
        for r in ROUTES {
            let path = fill(r, |n| format!("x{n}"));
            let s = segs(&path);
            assert_eq!(find(ROUTES, r.method, &s).unwrap().0, r, "{path}");
        }
        assert_eq!(
            ROUTES[2].path_params().collect::<Vec<_>>(),
            ["scope", "name"]
        );
    }
}
