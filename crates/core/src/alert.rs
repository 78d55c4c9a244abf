//! Azure Monitor's action groups and activity log alerts (MISSION TD-5), pure: the checks on
//! their ARM bodies, the view of an activity-log entry that alerts match, the matching, and
//! the payloads a webhook receiver gets (Azure Monitor's common alert schema, or the activity
//! log alert's own legacy schema). No I/O: the platform stores the resources, appends the
//! entries and delivers the payloads.
//!
//! What kagi takes from Azure, and where it differs:
//! - action groups (`Microsoft.Insights/actionGroups`, api-version 2023-01-01) are `Global`, have
//!   a `groupShortName` of 1–12 characters and deliver to `webhookReceivers` only. The other
//!   receiver kinds (email, SMS, voice, push, ITSM, runbooks, Logic Apps, Functions, Event
//!   Hubs, ARM roles) are refused when not empty (400 `ReceiverTypeNotSupported`): accepting
//!   an e-mail receiver that never mails would be a silent loss of the alert. A webhook with
//!   `useAadAuth` is refused the same way.
//! - activity log alerts (`Microsoft.Insights/activityLogAlerts`, api-version 2020-10-01) are
//!   `Global`, scoped to their own subscription (the subscription, resource groups, resources),
//!   and need a `category` condition, as in Azure. Conditions compare case-insensitively, as
//!   Azure's do.

use serde_json::{Map, Value, json};

use crate::{ErrorCode, KvError};

/// Most webhook receivers in one action group (Azure's limit).
pub const MAX_WEBHOOK_RECEIVERS: usize = 10;
/// Most action groups one activity log alert names (Azure's limit).
pub const MAX_ACTION_GROUPS: usize = 5;
/// Most scopes, conditions, or values in one condition, of one alert.
pub const MAX_LIST: usize = 100;
/// Longest description of an alert.
pub const MAX_DESCRIPTION: usize = 2048;

/// The receiver kinds of an action group other than webhooks (refused when not empty).
pub const OTHER_RECEIVERS: &[&str] = &[
    "emailReceivers",
    "smsReceivers",
    "azureAppPushReceivers",
    "itsmReceivers",
    "automationRunbookReceivers",
    "voiceReceivers",
    "logicAppReceivers",
    "azureFunctionReceivers",
    "armRoleReceivers",
    "eventHubReceivers",
];

/// The activity log categories an alert may ask for (Azure's).
pub const CATEGORIES: &[&str] = &[
    "Administrative",
    "ServiceHealth",
    "ResourceHealth",
    "Alert",
    "Autoscale",
    "Security",
    "Recommendation",
    "Policy",
];

/// The category of an activity entry that names none: what services record are the results
/// of operations on their resources, Azure's `Administrative` category.
pub const DEFAULT_CATEGORY: &str = "Administrative";

/// Which of the two resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MonitorKind {
    /// `Microsoft.Insights/actionGroups`.
    ActionGroup,
    /// `Microsoft.Insights/activityLogAlerts`.
    ActivityLogAlert,
}

impl MonitorKind {
    /// The kind a path's type segment names (any case).
    pub fn from_segment(segment: &str) -> Option<Self> {
        match segment.to_ascii_lowercase().as_str() {
            "actiongroups" => Some(Self::ActionGroup),
            "activitylogalerts" => Some(Self::ActivityLogAlert),
            _ => None,
        }
    }

    /// The type as ids spell it (`Microsoft.Insights/actionGroups`).
    pub fn id_type(self) -> &'static str {
        match self {
            Self::ActionGroup => "Microsoft.Insights/actionGroups",
            Self::ActivityLogAlert => "Microsoft.Insights/activityLogAlerts",
        }
    }

    /// The `type` of the resource in answers, as Azure spells it there.
    pub fn view_type(self) -> &'static str {
        match self {
            Self::ActionGroup => "Microsoft.Insights/ActionGroups",
            Self::ActivityLogAlert => "Microsoft.Insights/ActivityLogAlerts",
        }
    }

    /// What messages call it.
    pub fn noun(self) -> &'static str {
        match self {
            Self::ActionGroup => "action group",
            Self::ActivityLogAlert => "activity log alert",
        }
    }
}

fn bad(inner: &'static str, message: impl Into<String>) -> KvError {
    KvError::new(ErrorCode::BadRequest, message).with_inner(inner)
}

fn invalid(kind: MonitorKind, message: impl Into<String>) -> KvError {
    bad(
        match kind {
            MonitorKind::ActionGroup => "InvalidActionGroup",
            MonitorKind::ActivityLogAlert => "InvalidActivityLogAlert",
        },
        message,
    )
}

/// Checks a resource name: 1–260 characters, none of `<>*%&:\?+/#` nor control characters,
/// not ending with a space or a period (ARM's rule for these types).
pub fn validate_name(kind: MonitorKind, name: &str) -> Result<(), KvError> {
    let ok = !name.is_empty()
        && name.chars().count() <= 260
        && !name
            .chars()
            .any(|c| c.is_control() || "<>*%&:\\?+/#".contains(c))
        && !name.ends_with([' ', '.']);
    if ok {
        Ok(())
    } else {
        Err(bad(
            "InvalidResourceName",
            format!(
                "The {} name '{}' is invalid: use 1-260 characters, none of <>*%&:\\?+/#, not \
                 ending with a space or a period.",
                kind.noun(),
                crate::ids::printable(name)
            ),
        ))
    }
}

/// Checks `location`: these resources are `Global`. Answers its spelling in views.
pub fn check_location(kind: MonitorKind, body: &Value) -> Result<&'static str, KvError> {
    match body.get("location").and_then(Value::as_str) {
        Some(l) if l.trim().eq_ignore_ascii_case("global") => Ok("Global"),
        Some(l) => Err(bad(
            "LocationNotAvailableForResourceType",
            format!(
                "The location '{}' is not available for {}: use 'Global'.",
                crate::ids::printable(l),
                kind.view_type()
            ),
        )),
        None => Err(bad(
            "LocationRequired",
            "The property 'location' is required: use 'Global'.",
        )),
    }
}

/// `tags` of a body: an object of strings (absent: none).
pub fn check_tags(kind: MonitorKind, body: &Value) -> Result<Value, KvError> {
    match body.get("tags") {
        None | Some(Value::Null) => Ok(json!({})),
        Some(Value::Object(m)) if m.len() <= 50 && m.values().all(Value::is_string) => {
            Ok(Value::Object(m.clone()))
        }
        Some(_) => Err(invalid(
            kind,
            "tags must be an object of at most 50 strings.",
        )),
    }
}

fn properties(kind: MonitorKind, body: &Value) -> Result<&Map<String, Value>, KvError> {
    body.get("properties")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid(kind, "The property 'properties' is required."))
}

fn optional_bool(
    kind: MonitorKind,
    m: &Map<String, Value>,
    key: &str,
    default: bool,
) -> Result<bool, KvError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(invalid(kind, format!("'{key}' must be true or false."))),
    }
}

fn array<'a>(
    kind: MonitorKind,
    v: Option<&'a Value>,
    what: &str,
    max: usize,
) -> Result<&'a [Value], KvError> {
    match v {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) if a.len() <= max => Ok(a.as_slice()),
        Some(Value::Array(_)) => Err(invalid(
            kind,
            format!("'{what}' has more than {max} entries."),
        )),
        Some(_) => Err(invalid(kind, format!("'{what}' must be an array."))),
    }
}

/// A webhook receiver of an action group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookReceiver {
    /// Its name, unique (case-insensitively) in the group.
    pub name: String,
    /// The URL POSTed to (may carry a secret in its query).
    pub service_uri: String,
    /// Whether it gets the common alert schema (else the alert's own schema).
    pub use_common_alert_schema: bool,
}

/// An action group, as stored and as delivered to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActionGroup {
    /// `groupShortName`, 1–12 characters.
    pub short_name: String,
    /// A disabled group receives nothing.
    pub enabled: bool,
    /// Where notifications go.
    pub webhooks: Vec<WebhookReceiver>,
}

impl ActionGroup {
    /// Reads and checks the `properties` of a PUT body (or of a stored resource: views are
    /// valid input).
    pub fn parse(body: &Value) -> Result<Self, KvError> {
        let kind = MonitorKind::ActionGroup;
        let p = properties(kind, body)?;
        let short_name = p
            .get("groupShortName")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(kind, "The property 'groupShortName' is required."))?;
        if !(1..=12).contains(&short_name.chars().count())
            || short_name.chars().any(char::is_control)
        {
            return Err(invalid(
                kind,
                format!(
                    "groupShortName '{}' must be 1 to 12 characters.",
                    crate::ids::printable(short_name)
                ),
            ));
        }
        for other in OTHER_RECEIVERS {
            if !array(kind, p.get(*other), other, usize::MAX)?.is_empty() {
                return Err(bad(
                    "ReceiverTypeNotSupported",
                    format!(
                        "{other} are not supported: kagi's action groups deliver to \
                         webhookReceivers only. Send them through a webhook instead."
                    ),
                ));
            }
        }
        let mut webhooks: Vec<WebhookReceiver> = Vec::new();
        for r in array(
            kind,
            p.get("webhookReceivers"),
            "webhookReceivers",
            MAX_WEBHOOK_RECEIVERS,
        )? {
            let r = r
                .as_object()
                .ok_or_else(|| invalid(kind, "Each webhook receiver must be an object."))?;
            let name = r
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.trim().is_empty() && n.chars().count() <= 128)
                .ok_or_else(|| {
                    invalid(
                        kind,
                        "Each webhook receiver needs a name of 1-128 characters.",
                    )
                })?;
            if webhooks.iter().any(|w| w.name.eq_ignore_ascii_case(name)) {
                return Err(invalid(
                    kind,
                    format!(
                        "The receiver name '{}' is used twice.",
                        crate::ids::printable(name)
                    ),
                ));
            }
            let uri = r.get("serviceUri").and_then(Value::as_str).ok_or_else(|| {
                invalid(
                    kind,
                    format!(
                        "The webhook receiver '{}' needs a serviceUri.",
                        crate::ids::printable(name)
                    ),
                )
            })?;
            if let Some(why) = crate::event::webhook_url_problem(uri) {
                return Err(bad(
                    "InvalidServiceUri",
                    format!(
                        "The serviceUri of the webhook receiver '{}' is invalid: {why}.",
                        crate::ids::printable(name)
                    ),
                ));
            }
            if optional_bool(kind, r, "useAadAuth", false)? {
                return Err(bad(
                    "ReceiverTypeNotSupported",
                    "Webhook receivers with useAadAuth are not supported: kagi sends no \
                     Entra token with its webhooks (put a secret in the serviceUri's query).",
                ));
            }
            webhooks.push(WebhookReceiver {
                name: name.to_string(),
                service_uri: uri.to_string(),
                use_common_alert_schema: optional_bool(kind, r, "useCommonAlertSchema", false)?,
            });
        }
        Ok(Self {
            short_name: short_name.to_string(),
            enabled: optional_bool(kind, p, "enabled", true)?,
            webhooks,
        })
    }

    /// The `properties` of the resource's view (every receiver kind, as Azure answers them).
    pub fn properties_view(&self) -> Value {
        let mut p = Map::new();
        p.insert("groupShortName".into(), json!(self.short_name));
        p.insert("enabled".into(), json!(self.enabled));
        for other in OTHER_RECEIVERS {
            p.insert((*other).into(), json!([]));
        }
        p.insert(
            "webhookReceivers".into(),
            Value::Array(
                self.webhooks
                    .iter()
                    .map(|w| {
                        json!({"name": w.name, "serviceUri": w.service_uri,
                            "useCommonAlertSchema": w.use_common_alert_schema, "useAadAuth": false})
                    })
                    .collect(),
            ),
        );
        Value::Object(p)
    }
}

/// A field of an activity entry that conditions may test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Field {
    /// `category` (`Administrative`, …).
    Category,
    /// `operationName`.
    OperationName,
    /// `resourceId`.
    ResourceId,
    /// `resourceType` (`Microsoft.Sql/servers/databases`).
    ResourceType,
    /// `resourceGroup`.
    ResourceGroup,
    /// `resourceProvider` (`Microsoft.Sql`).
    ResourceProvider,
    /// `status` (`Succeeded`, `Failed`, …).
    Status,
    /// `subStatus`.
    SubStatus,
    /// `level` (`Informational`, `Warning`, `Error`, `Critical`, `Verbose`).
    Level,
    /// `caller`.
    Caller,
}

impl Field {
    const ALL: [Field; 10] = [
        Field::Category,
        Field::OperationName,
        Field::ResourceId,
        Field::ResourceType,
        Field::ResourceGroup,
        Field::ResourceProvider,
        Field::Status,
        Field::SubStatus,
        Field::Level,
        Field::Caller,
    ];

    /// Its name in conditions (and in activity entries).
    pub fn name(self) -> &'static str {
        match self {
            Self::Category => "category",
            Self::OperationName => "operationName",
            Self::ResourceId => "resourceId",
            Self::ResourceType => "resourceType",
            Self::ResourceGroup => "resourceGroup",
            Self::ResourceProvider => "resourceProvider",
            Self::Status => "status",
            Self::SubStatus => "subStatus",
            Self::Level => "level",
            Self::Caller => "caller",
        }
    }

    /// The field a condition names (any case).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(name))
    }
}

/// One test of a field: `equals` one value, or `containsAny` of several (a value equal to any
/// of them, case-insensitively).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// The field tested.
    pub field: Field,
    /// The values it may equal.
    pub values: Vec<String>,
    /// Whether the values came as `containsAny` (for the view).
    pub contains_any: bool,
}

impl Leaf {
    fn matches(&self, e: &ActivityEvent) -> bool {
        e.field(self.field)
            .is_some_and(|v| self.values.iter().any(|w| w.eq_ignore_ascii_case(v)))
    }

    fn view(&self) -> Value {
        if self.contains_any {
            json!({"field": self.field.name(), "containsAny": self.values})
        } else {
            json!({"field": self.field.name(), "equals": self.values.first()})
        }
    }
}

/// An entry of `condition.allOf`: a leaf, or `anyOf` leaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Clause {
    /// One test.
    Leaf(Leaf),
    /// At least one of the tests.
    AnyOf(Vec<Leaf>),
}

impl Clause {
    fn matches(&self, e: &ActivityEvent) -> bool {
        match self {
            Self::Leaf(l) => l.matches(e),
            Self::AnyOf(ls) => ls.iter().any(|l| l.matches(e)),
        }
    }

    fn view(&self) -> Value {
        match self {
            Self::Leaf(l) => l.view(),
            Self::AnyOf(ls) => json!({"anyOf": ls.iter().map(Leaf::view).collect::<Vec<_>>()}),
        }
    }

    /// Whether the clause tests only `category` (with allowed values).
    fn is_category(&self) -> bool {
        match self {
            Self::Leaf(l) => l.field == Field::Category,
            Self::AnyOf(ls) => !ls.is_empty() && ls.iter().all(|l| l.field == Field::Category),
        }
    }
}

fn parse_leaf(m: &Map<String, Value>) -> Result<Leaf, KvError> {
    let kind = MonitorKind::ActivityLogAlert;
    let name = m
        .get("field")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(kind, "Each condition needs a 'field'."))?;
    let field = Field::parse(name).ok_or_else(|| {
        invalid(
            kind,
            format!(
                "The condition field '{}' is not supported; kagi's fields are {}.",
                crate::ids::printable(name),
                Field::ALL.map(Field::name).join(", ")
            ),
        )
    })?;
    let as_text = |v: &Value| -> Result<String, KvError> {
        v.as_str()
            .filter(|s| s.chars().count() <= 1024)
            .map(str::to_string)
            .ok_or_else(|| {
                invalid(
                    kind,
                    format!(
                        "The values of the condition on '{}' must be strings.",
                        field.name()
                    ),
                )
            })
    };
    let (values, contains_any) = match (m.get("equals"), m.get("containsAny")) {
        (Some(v), None | Some(Value::Null)) if !v.is_null() => (vec![as_text(v)?], false),
        (None | Some(Value::Null), Some(Value::Array(a)))
            if !a.is_empty() && a.len() <= MAX_LIST =>
        {
            (a.iter().map(as_text).collect::<Result<_, _>>()?, true)
        }
        _ => {
            return Err(invalid(
                kind,
                format!(
                    "The condition on '{}' needs either 'equals' (a string) or 'containsAny' \
                     (1-{MAX_LIST} strings).",
                    field.name()
                ),
            ));
        }
    };
    if field == Field::Category {
        for v in &values {
            if !CATEGORIES.iter().any(|c| c.eq_ignore_ascii_case(v)) {
                return Err(invalid(
                    kind,
                    format!(
                        "The category '{}' is not an activity log category ({}).",
                        crate::ids::printable(v),
                        CATEGORIES.join(", ")
                    ),
                ));
            }
        }
    }
    Ok(Leaf {
        field,
        values,
        contains_any,
    })
}

/// One action of an alert: an action group and the properties its webhooks get.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertAction {
    /// The action group's id, as given.
    pub action_group_id: String,
    /// `webhookProperties`: strings passed to the receivers (`customProperties` in the common
    /// schema, `properties` in the legacy one).
    pub webhook_properties: Map<String, Value>,
}

/// An activity log alert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActivityLogAlert {
    /// Resource ids entries must lie at or under (one of them).
    pub scopes: Vec<String>,
    /// `condition.allOf`: every clause must hold.
    pub all_of: Vec<Clause>,
    /// `actions.actionGroups`.
    pub actions: Vec<AlertAction>,
    /// A disabled alert fires nothing.
    pub enabled: bool,
    /// `description`.
    pub description: Option<String>,
}

/// Whether `scope` is a subscription, a resource group or a resource id (segments
/// `/subscriptions/{s}[/resourceGroups/{g}[/providers/{ns}/{type}/{name}[/{type}/{name}]…]]`).
pub fn valid_alert_scope(scope: &str) -> bool {
    let segs: Vec<&str> = scope.split('/').collect();
    if segs.iter().skip(1).any(|s| s.is_empty()) || segs.first() != Some(&"") {
        return false;
    }
    let head = |i: usize, name: &str| segs.get(i).is_some_and(|s| s.eq_ignore_ascii_case(name));
    match segs.len() {
        3 => head(1, "subscriptions"),
        5 => head(1, "subscriptions") && head(3, "resourceGroups"),
        n if n >= 9 && (n - 9) % 2 == 0 => {
            head(1, "subscriptions") && head(3, "resourceGroups") && head(5, "providers")
        }
        _ => false,
    }
}

/// The subscription of a resource id (`/subscriptions/{s}/…`), if it has one.
pub fn subscription_of(id: &str) -> Option<&str> {
    let mut segs = id.split('/');
    match (segs.next(), segs.next(), segs.next()) {
        (Some(""), Some(s), Some(sub)) if s.eq_ignore_ascii_case("subscriptions") => Some(sub),
        _ => None,
    }
}

/// Whether an action group id is one (`/subscriptions/{s}/resourceGroups/{g}/providers/
/// Microsoft.Insights/actionGroups/{name}`).
pub fn valid_action_group_id(id: &str) -> bool {
    let segs: Vec<&str> = id.split('/').collect();
    segs.len() == 9
        && valid_alert_scope(id)
        && segs[6].eq_ignore_ascii_case("Microsoft.Insights")
        && segs[7].eq_ignore_ascii_case("actionGroups")
}

impl ActivityLogAlert {
    /// Reads and checks the `properties` of a PUT body for an alert in `subscription` (or of a
    /// stored alert: views are valid input).
    pub fn parse(body: &Value, subscription: &str) -> Result<Self, KvError> {
        let kind = MonitorKind::ActivityLogAlert;
        let p = properties(kind, body)?;
        let scopes_in = array(kind, p.get("scopes"), "scopes", MAX_LIST)?;
        if scopes_in.is_empty() {
            return Err(invalid(
                kind,
                "The property 'scopes' needs at least one scope.",
            ));
        }
        let mut scopes = Vec::new();
        for s in scopes_in {
            let s = s
                .as_str()
                .map(|s| s.trim_end_matches('/'))
                .filter(|s| valid_alert_scope(s))
                .ok_or_else(|| {
                    invalid(
                        kind,
                        format!(
                            "The scope '{}' is not a subscription, resource group or resource id.",
                            crate::ids::printable(&s.to_string())
                        ),
                    )
                })?;
            if !subscription_of(s).is_some_and(|x| x.eq_ignore_ascii_case(subscription)) {
                return Err(invalid(
                    kind,
                    format!(
                        "The scope '{}' is outside the alert's subscription '{subscription}'.",
                        crate::ids::printable(s)
                    ),
                ));
            }
            scopes.push(s.to_string());
        }
        let all_of_in = p
            .get("condition")
            .and_then(|c| c.get("allOf"))
            .and_then(Value::as_array)
            .filter(|a| !a.is_empty() && a.len() <= MAX_LIST)
            .ok_or_else(|| {
                invalid(
                    kind,
                    format!("The property 'condition.allOf' needs 1-{MAX_LIST} conditions."),
                )
            })?;
        let mut all_of = Vec::new();
        for c in all_of_in {
            let m = c
                .as_object()
                .ok_or_else(|| invalid(kind, "Each condition must be an object."))?;
            match m.get("anyOf") {
                Some(Value::Array(a)) if !a.is_empty() && a.len() <= MAX_LIST => {
                    if m.get("field").is_some_and(|f| !f.is_null()) {
                        return Err(invalid(
                            kind,
                            "A condition has either 'field' or 'anyOf', not both.",
                        ));
                    }
                    let leaves = a
                        .iter()
                        .map(|l| {
                            l.as_object()
                                .ok_or_else(|| {
                                    invalid(kind, "Each anyOf condition must be an object.")
                                })
                                .and_then(parse_leaf)
                        })
                        .collect::<Result<_, _>>()?;
                    all_of.push(Clause::AnyOf(leaves));
                }
                None | Some(Value::Null) => all_of.push(Clause::Leaf(parse_leaf(m)?)),
                Some(_) => {
                    return Err(invalid(
                        kind,
                        format!("'anyOf' must be an array of 1-{MAX_LIST} conditions."),
                    ));
                }
            }
        }
        if !all_of.iter().any(Clause::is_category) {
            return Err(invalid(
                kind,
                "The condition must test 'category' (for example {\"field\": \"category\", \
                 \"equals\": \"Administrative\"}), as Azure's activity log alerts do.",
            ));
        }
        let mut actions: Vec<AlertAction> = Vec::new();
        let groups = match p.get("actions") {
            None | Some(Value::Null) => &[][..],
            Some(a) => array(
                kind,
                a.get("actionGroups"),
                "actions.actionGroups",
                MAX_ACTION_GROUPS,
            )?,
        };
        for g in groups {
            let id = g
                .get("actionGroupId")
                .and_then(Value::as_str)
                .map(|s| s.trim_end_matches('/'))
                .filter(|s| valid_action_group_id(s))
                .ok_or_else(|| {
                    invalid(
                        kind,
                        "Each action needs an 'actionGroupId': /subscriptions/{id}/resourceGroups/\
                         {name}/providers/Microsoft.Insights/actionGroups/{name}.",
                    )
                })?;
            let webhook_properties = match g.get("webhookProperties") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(m))
                    if m.len() <= MAX_LIST && m.values().all(Value::is_string) =>
                {
                    m.clone()
                }
                Some(_) => {
                    return Err(invalid(
                        kind,
                        format!(
                            "'webhookProperties' must be an object of at most {MAX_LIST} strings."
                        ),
                    ));
                }
            };
            if actions
                .iter()
                .any(|a| a.action_group_id.eq_ignore_ascii_case(id))
            {
                return Err(invalid(
                    kind,
                    format!(
                        "The action group '{}' is named twice.",
                        crate::ids::printable(id)
                    ),
                ));
            }
            actions.push(AlertAction {
                action_group_id: id.to_string(),
                webhook_properties,
            });
        }
        let description = match p.get("description") {
            None | Some(Value::Null) => None,
            Some(Value::String(d)) if d.chars().count() <= MAX_DESCRIPTION => Some(d.clone()),
            Some(_) => {
                return Err(invalid(
                    kind,
                    format!(
                        "'description' must be a string of at most {MAX_DESCRIPTION} characters."
                    ),
                ));
            }
        };
        Ok(Self {
            scopes,
            all_of,
            actions,
            enabled: optional_bool(kind, p, "enabled", true)?,
            description,
        })
    }

    /// The `properties` of the resource's view.
    pub fn properties_view(&self) -> Value {
        json!({
            "scopes": self.scopes,
            "condition": {"allOf": self.all_of.iter().map(Clause::view).collect::<Vec<_>>()},
            "actions": {"actionGroups": self.actions.iter().map(|a| json!({
                "actionGroupId": a.action_group_id,
                "webhookProperties": a.webhook_properties,
            })).collect::<Vec<_>>()},
            "enabled": self.enabled,
            "description": self.description,
        })
    }

    /// Whether the alert fires for `e`: enabled, `e`'s resource at or under one of its scopes,
    /// and every condition holds.
    pub fn matches(&self, e: &ActivityEvent) -> bool {
        self.enabled
            && self
                .scopes
                .iter()
                .any(|s| crate::policy::in_scope(s, &e.resource_id))
            && self.all_of.iter().all(|c| c.matches(e))
    }
}

/// An activity-log entry as alerts see it: the entry's own fields, and what its resource id
/// tells (type, group, provider, subscription).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActivityEvent {
    /// `category` (default [`DEFAULT_CATEGORY`]).
    pub category: String,
    /// `operationName`.
    pub operation_name: String,
    /// `resourceId`: the entry's, else the resource whose log it is in.
    pub resource_id: String,
    /// `resourceType`: the entry's, else from the resource id.
    pub resource_type: String,
    /// The resource group of the resource id.
    pub resource_group: String,
    /// The provider namespace of the resource id.
    pub resource_provider: String,
    /// The subscription of the resource id.
    pub subscription_id: String,
    /// `status`.
    pub status: String,
    /// `subStatus`.
    pub sub_status: String,
    /// `level`: the entry's, else `Error` for a `Failed` status, else `Informational`.
    pub level: String,
    /// `caller`, if the entry names one.
    pub caller: Option<String>,
    /// `message`, if any.
    pub message: Option<String>,
    /// `eventTimestamp`: the entry's, else when it was appended.
    pub event_timestamp: String,
}

/// The parts of a resource id: (subscription, resource group, provider namespace, type).
/// `/subscriptions/s/resourceGroups/g/providers/Microsoft.Sql/servers/a/databases/b` gives
/// (`s`, `g`, `Microsoft.Sql`, `Microsoft.Sql/servers/databases`).
pub fn resource_id_parts(id: &str) -> (String, String, String, String) {
    let segs: Vec<&str> = id.trim_matches('/').split('/').collect();
    let find = |name: &str| {
        segs.iter()
            .position(|s| s.eq_ignore_ascii_case(name))
            .and_then(|i| segs.get(i + 1))
            .map_or_else(String::new, |s| (*s).to_string())
    };
    let subscription = find("subscriptions");
    let group = find("resourceGroups");
    let (provider, rtype) = match segs
        .iter()
        .rposition(|s| s.eq_ignore_ascii_case("providers"))
    {
        Some(i) if i + 2 < segs.len() => {
            let ns = segs[i + 1];
            let types: Vec<&str> = segs[i + 2..].iter().step_by(2).copied().collect();
            (ns.to_string(), format!("{ns}/{}", types.join("/")))
        }
        _ if !group.is_empty() => (
            "Microsoft.Resources".to_string(),
            "Microsoft.Resources/resourceGroups".to_string(),
        ),
        _ => (
            "Microsoft.Resources".to_string(),
            "Microsoft.Resources/subscriptions".to_string(),
        ),
    };
    (subscription, group, provider, rtype)
}

impl ActivityEvent {
    /// The view of `entry`, appended at `now` to the activity log of `log_resource_id`. Only
    /// the fields named here are read: whatever else an entry holds never reaches a payload.
    pub fn from_entry(log_resource_id: &str, entry: &Value, now: i64) -> Self {
        let text = |k: &str| {
            entry
                .get(k)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let resource_id = text("resourceId").unwrap_or_else(|| log_resource_id.to_string());
        let (subscription_id, resource_group, resource_provider, rtype) =
            resource_id_parts(&resource_id);
        let status = text("status").unwrap_or_default();
        let level = text("level").unwrap_or_else(|| {
            if status.eq_ignore_ascii_case("Failed") {
                "Error".into()
            } else {
                "Informational".into()
            }
        });
        Self {
            category: text("category").unwrap_or_else(|| DEFAULT_CATEGORY.into()),
            operation_name: text("operationName").unwrap_or_default(),
            resource_type: text("resourceType").unwrap_or(rtype),
            resource_id,
            resource_group,
            resource_provider,
            subscription_id,
            status,
            sub_status: text("subStatus").unwrap_or_default(),
            level,
            caller: text("caller"),
            message: text("message"),
            event_timestamp: text("eventTimestamp").unwrap_or_else(|| crate::time::rfc3339(now)),
        }
    }

    /// The value of a field, if the entry has one.
    pub fn field(&self, f: Field) -> Option<&str> {
        let v = match f {
            Field::Category => &self.category,
            Field::OperationName => &self.operation_name,
            Field::ResourceId => &self.resource_id,
            Field::ResourceType => &self.resource_type,
            Field::ResourceGroup => &self.resource_group,
            Field::ResourceProvider => &self.resource_provider,
            Field::Status => &self.status,
            Field::SubStatus => &self.sub_status,
            Field::Level => &self.level,
            Field::Caller => return self.caller.as_deref(),
        };
        Some(v.as_str())
    }
}

/// One firing of an alert for one entry: what both payloads say besides the entry.
#[derive(Clone, Debug)]
pub struct Firing<'a> {
    /// The alert's ARM id.
    pub alert_rule_id: &'a str,
    /// The alert's name.
    pub alert_rule: &'a str,
    /// The alert's description.
    pub description: Option<&'a str>,
    /// This firing's id (a UUID; the same for every receiver of the firing).
    pub instance_id: &'a str,
    /// The entry's id (a UUID; the same for every alert the entry fires).
    pub event_data_id: &'a str,
    /// When it fired (Unix seconds).
    pub fired_at: i64,
    /// The action's `webhookProperties`.
    pub webhook_properties: &'a Map<String, Value>,
}

/// The payload in Azure Monitor's common alert schema (`azureMonitorCommonAlertSchema`).
pub fn common_alert_payload(f: &Firing, e: &ActivityEvent) -> Value {
    let sub = subscription_of(f.alert_rule_id).unwrap_or_default();
    let target_name = e.resource_id.rsplit('/').next().unwrap_or_default();
    json!({
        "schemaId": "azureMonitorCommonAlertSchema",
        "data": {
            "essentials": {
                "alertId": format!("/subscriptions/{sub}/providers/Microsoft.AlertsManagement/alerts/{}", f.instance_id),
                "alertRule": f.alert_rule,
                "alertRuleID": f.alert_rule_id,
                "severity": "Sev4",
                "signalType": "Activity Log",
                "monitorCondition": "Fired",
                "monitoringService": format!("Activity Log - {}", e.category),
                "alertTargetIDs": [e.resource_id],
                "configurationItems": [target_name],
                "originAlertId": f.event_data_id,
                "firedDateTime": crate::time::rfc3339(f.fired_at),
                "description": f.description.unwrap_or_default(),
                "essentialsVersion": "1.0",
                "alertContextVersion": "1.0",
                "targetResourceType": e.resource_type,
                "targetResourceGroup": e.resource_group,
            },
            "alertContext": {
                "channels": "Operation",
                "caller": e.caller,
                "eventSource": e.category,
                "eventTimestamp": e.event_timestamp,
                "eventDataId": f.event_data_id,
                "level": e.level,
                "operationName": e.operation_name,
                "status": e.status,
                "subStatus": e.sub_status,
                "submissionTimestamp": crate::time::rfc3339(f.fired_at),
                "resourceId": e.resource_id,
                "message": e.message,
            },
            "customProperties": if f.webhook_properties.is_empty() {
                Value::Null
            } else {
                Value::Object(f.webhook_properties.clone())
            },
        },
    })
}

/// The payload in the activity log alert's own (legacy) schema
/// (`Microsoft.Insights/activityLogs`).
pub fn legacy_alert_payload(f: &Firing, e: &ActivityEvent) -> Value {
    json!({
        "schemaId": "Microsoft.Insights/activityLogs",
        "data": {
            "status": "Activated",
            "context": {
                "activityLog": {
                    "channels": "Operation",
                    "caller": e.caller,
                    "description": e.message.clone().unwrap_or_default(),
                    "eventSource": e.category,
                    "eventTimestamp": e.event_timestamp,
                    "eventDataId": f.event_data_id,
                    "level": e.level,
                    "operationName": e.operation_name,
                    "resourceId": e.resource_id,
                    "resourceGroupName": e.resource_group,
                    "resourceProviderName": e.resource_provider,
                    "resourceType": e.resource_type,
                    "status": e.status,
                    "subStatus": e.sub_status,
                    "subscriptionId": e.subscription_id,
                    "submissionTimestamp": crate::time::rfc3339(f.fired_at),
                },
            },
            "properties": f.webhook_properties,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUB: &str = "00000000-0000-4000-8000-000000000001";

    fn rg(name: &str) -> String {
        format!("/subscriptions/{SUB}/resourceGroups/{name}")
    }

    fn ag_id(name: &str) -> String {
        format!(
            "{}/providers/Microsoft.Insights/actionGroups/{name}",
            rg("rg1")
        )
    }

    fn alert_body(scopes: Value, all_of: Value) -> Value {
        json!({"location": "Global", "properties": {"scopes": scopes,
            "condition": {"allOf": all_of},
            "actions": {"actionGroups": [{"actionGroupId": ag_id("ag1"),
                                          "webhookProperties": {"team": "dba"}}]},
            "enabled": true, "description": "TDE protector lost"}})
    }

    fn db_entry(op: &str) -> Value {
        json!({"operationName": op, "status": "Succeeded",
               "eventTimestamp": "2026-12-05T10:00:00Z",
               "resourceId": format!("{}/providers/Microsoft.Sql/servers/s1/databases/db1", rg("rg1")),
               "message": "Database 'db1' is inaccessible: KeyDisabled"})
    }

    fn server_log() -> String {
        format!("{}/providers/Microsoft.Sql/servers/s1", rg("rg1"))
    }

    #[test]
    fn action_groups_are_checked_and_viewed_as_azure_answers() {
        let body = json!({"location": "Global", "properties": {"groupShortName": "dba",
            "enabled": true, "emailReceivers": [],
            "webhookReceivers": [{"name": "hook", "serviceUri": "https://h.example/x?code=1",
                                  "useCommonAlertSchema": true}]}});
        assert_eq!(
            check_location(MonitorKind::ActionGroup, &body).unwrap(),
            "Global"
        );
        let g = ActionGroup::parse(&body).unwrap();
        assert_eq!(g.short_name, "dba");
        assert!(g.enabled && g.webhooks[0].use_common_alert_schema);
        let view = json!({"properties": g.properties_view()});
        assert_eq!(view["properties"]["smsReceivers"], json!([]));
        assert_eq!(
            view["properties"]["webhookReceivers"][0]["useAadAuth"],
            false
        );
        // A view reads back as the same group.
        assert_eq!(ActionGroup::parse(&view).unwrap(), g);
        // Defaults: enabled, legacy schema, no receivers.
        let g = ActionGroup::parse(&json!({"properties": {"groupShortName": "x"}})).unwrap();
        assert!(g.enabled && g.webhooks.is_empty());

        let hook = |extra: Value| {
            let mut r = json!({"name": "h", "serviceUri": "https://h.example/"});
            for (k, v) in extra.as_object().unwrap() {
                r[k] = v.clone();
            }
            json!({"properties": {"groupShortName": "ok", "webhookReceivers": [r]}})
        };
        let cases: Vec<(Value, &str)> = vec![
            (json!({}), "InvalidActionGroup"),
            (json!({"properties": {}}), "InvalidActionGroup"),
            (
                json!({"properties": {"groupShortName": ""}}),
                "InvalidActionGroup",
            ),
            (
                json!({"properties": {"groupShortName": "thirteen-char"}}),
                "InvalidActionGroup",
            ),
            (
                json!({"properties": {"groupShortName": "x", "enabled": "yes"}}),
                "InvalidActionGroup",
            ),
            (
                json!({"properties": {"groupShortName": "x",
                "emailReceivers": [{"name": "e", "emailAddress": "a@b.c"}]}}),
                "ReceiverTypeNotSupported",
            ),
            (hook(json!({"serviceUri": "ftp://h/"})), "InvalidServiceUri"),
            (hook(json!({"serviceUri": "https://"})), "InvalidServiceUri"),
            (hook(json!({"serviceUri": null})), "InvalidActionGroup"),
            (hook(json!({"name": ""})), "InvalidActionGroup"),
            (
                hook(json!({"useAadAuth": true})),
                "ReceiverTypeNotSupported",
            ),
            (
                hook(json!({"useCommonAlertSchema": "true"})),
                "InvalidActionGroup",
            ),
            (
                json!({"properties": {"groupShortName": "x", "webhookReceivers": [
                {"name": "a", "serviceUri": "https://h/"}, {"name": "A", "serviceUri": "https://h/"}]}}),
                "InvalidActionGroup",
            ),
            (
                json!({"properties": {"groupShortName": "x", "webhookReceivers": {}}}),
                "InvalidActionGroup",
            ),
        ];
        for (body, inner) in cases {
            let e = ActionGroup::parse(&body).unwrap_err();
            assert_eq!((e.status(), e.inner), (400, Some(inner)), "{body}");
        }
        let many: Vec<Value> = (0..11)
            .map(|i| json!({"name": format!("h{i}"), "serviceUri": "https://h/"}))
            .collect();
        assert!(
            ActionGroup::parse(
                &json!({"properties": {"groupShortName": "x", "webhookReceivers": many}})
            )
            .is_err()
        );
    }

    #[test]
    fn locations_names_and_tags() {
        let k = MonitorKind::ActivityLogAlert;
        assert_eq!(
            check_location(k, &json!({"location": "global"})).unwrap(),
            "Global"
        );
        for (b, inner) in [
            (
                json!({"location": "westeurope"}),
                "LocationNotAvailableForResourceType",
            ),
            (json!({}), "LocationRequired"),
        ] {
            assert_eq!(check_location(k, &b).unwrap_err().inner, Some(inner));
        }
        assert!(validate_name(k, "db-inaccessible (prod)").is_ok());
        for bad in ["", "a/b", "a?b", "end.", "end ", "a\nb", &"x".repeat(261)] {
            assert_eq!(validate_name(k, bad).unwrap_err().status(), 400, "{bad:?}");
        }
        assert_eq!(check_tags(k, &json!({})).unwrap(), json!({}));
        assert!(check_tags(k, &json!({"tags": {"a": 1}})).is_err());
        assert_eq!(
            MonitorKind::from_segment("ACTIONGROUPS"),
            Some(MonitorKind::ActionGroup)
        );
        assert_eq!(MonitorKind::from_segment("metricalerts"), None);
    }

    #[test]
    fn scopes_and_ids() {
        for ok in [
            format!("/subscriptions/{SUB}"),
            rg("rg1"),
            format!("{}/providers/Microsoft.Sql/servers/s1", rg("rg1")),
            format!(
                "{}/providers/Microsoft.Sql/servers/s1/databases/d",
                rg("rg1")
            ),
        ] {
            assert!(valid_alert_scope(&ok), "{ok}");
        }
        for bad in [
            "",
            "/",
            "/subscriptions",
            "subscriptions/x",
            "/subscriptions/x/resourceGroups",
            "/subscriptions/x/resourceGroups/g/providers/Microsoft.Sql",
            "/subscriptions/x/resourceGroups/g/providers/Microsoft.Sql/servers",
            "/subscriptions/x/resourceGroups/g/providers/Microsoft.Sql/servers/s/databases",
            "/subscriptions//resourceGroups/g",
            "/tenants/x",
        ] {
            assert!(!valid_alert_scope(bad), "{bad}");
        }
        assert!(valid_action_group_id(&ag_id("ag1")));
        assert!(!valid_action_group_id(&format!(
            "{}/providers/Microsoft.Insights/activityLogAlerts/a",
            rg("g")
        )));
        assert_eq!(subscription_of(&rg("x")), Some(SUB));
        let (s, g, p, t) = resource_id_parts(&format!(
            "{}/providers/Microsoft.Sql/servers/s1/databases/db1",
            rg("rg1")
        ));
        assert_eq!(
            (s.as_str(), g.as_str(), p.as_str(), t.as_str()),
            (
                SUB,
                "rg1",
                "Microsoft.Sql",
                "Microsoft.Sql/servers/databases"
            )
        );
        assert_eq!(
            resource_id_parts(&rg("rg1")).3,
            "Microsoft.Resources/resourceGroups"
        );
    }

    #[test]
    fn alerts_are_checked_and_read_back() {
        let cat = json!({"field": "category", "equals": "Administrative"});
        let body = alert_body(
            json!([rg("rg1")]),
            json!([cat, {"anyOf": [{"field": "operationName", "equals": "MakeDatabaseInaccessible"},
                                   {"field": "OPERATIONNAME", "equals": "MakeDatabaseAccessible"}]}]),
        );
        let a = ActivityLogAlert::parse(&body, SUB).unwrap();
        assert_eq!(a.scopes, vec![rg("rg1")]);
        assert_eq!(a.actions[0].webhook_properties["team"], "dba");
        assert_eq!(a.description.as_deref(), Some("TDE protector lost"));
        let view = json!({"properties": a.properties_view()});
        assert_eq!(
            view["properties"]["condition"]["allOf"][1]["anyOf"][1]["field"],
            "operationName"
        );
        assert_eq!(ActivityLogAlert::parse(&view, SUB).unwrap(), a);

        let other_sub = "/subscriptions/00000000-0000-4000-8000-0000000000ff";
        let cases: Vec<Value> = vec![
            json!({"properties": {}}),
            alert_body(json!([]), json!([cat])),
            alert_body(json!(["/nope"]), json!([cat])),
            alert_body(json!([other_sub]), json!([cat])),
            alert_body(json!([rg("rg1")]), json!([])),
            alert_body(json!([rg("rg1")]), json!({})),
            // No category condition.
            alert_body(
                json!([rg("rg1")]),
                json!([{"field": "operationName", "equals": "x"}]),
            ),
            alert_body(
                json!([rg("rg1")]),
                json!([{"field": "category", "equals": "Nonsense"}]),
            ),
            alert_body(
                json!([rg("rg1")]),
                json!([cat, {"field": "properties.x", "equals": "y"}]),
            ),
            alert_body(json!([rg("rg1")]), json!([cat, {"field": "status"}])),
            alert_body(
                json!([rg("rg1")]),
                json!([cat, {"field": "status", "equals": 1}]),
            ),
            alert_body(
                json!([rg("rg1")]),
                json!([cat, {"field": "status", "containsAny": []}]),
            ),
            alert_body(json!([rg("rg1")]), json!([cat, {"anyOf": []}])),
            alert_body(json!([rg("rg1")]), json!([cat, {"anyOf": [{"anyOf": []}]}])),
            alert_body(json!([rg("rg1")]), json!([cat, "status"])),
        ];
        for body in cases {
            let e = ActivityLogAlert::parse(&body, SUB).unwrap_err();
            assert_eq!(
                (e.status(), e.inner),
                (400, Some("InvalidActivityLogAlert")),
                "{body}"
            );
        }
        let mut b = alert_body(json!([rg("rg1")]), json!([cat]));
        b["properties"]["actions"]["actionGroups"][0]["actionGroupId"] =
            json!("/subscriptions/x/nope");
        assert!(ActivityLogAlert::parse(&b, SUB).is_err());
        b["properties"]["actions"]["actionGroups"] =
            json!([{"actionGroupId": ag_id("a")}, {"actionGroupId": ag_id("A")}]);
        assert!(ActivityLogAlert::parse(&b, SUB).is_err());
        b["properties"]["actions"] = json!({"actionGroups": [{"actionGroupId": ag_id("a"),
            "webhookProperties": {"n": 1}}]});
        assert!(ActivityLogAlert::parse(&b, SUB).is_err());
        b["properties"]["actions"] = Value::Null;
        assert!(ActivityLogAlert::parse(&b, SUB).unwrap().actions.is_empty());
        b["properties"]["description"] = json!("x".repeat(MAX_DESCRIPTION + 1));
        assert!(ActivityLogAlert::parse(&b, SUB).is_err());
    }

    #[test]
    fn entries_are_viewed_with_azure_defaults() {
        let e = ActivityEvent::from_entry(&server_log(), &db_entry("MakeDatabaseInaccessible"), 0);
        assert_eq!(e.category, "Administrative");
        assert_eq!(e.level, "Informational");
        assert_eq!(e.resource_type, "Microsoft.Sql/servers/databases");
        assert_eq!(e.resource_group, "rg1");
        assert_eq!(e.resource_provider, "Microsoft.Sql");
        assert_eq!(e.caller, None);
        // No resourceId: the log's resource; no timestamp: when appended; Failed: Error.
        let e = ActivityEvent::from_entry(
            &server_log(),
            &json!({"operationName": "x", "status": "Failed", "secret": "never read"}),
            0,
        );
        assert_eq!(e.resource_id, server_log());
        assert_eq!(e.resource_type, "Microsoft.Sql/servers");
        assert_eq!(e.level, "Error");
        assert_eq!(e.event_timestamp, "1970-01-01T00:00:00Z");
        let e = ActivityEvent::from_entry(
            &server_log(),
            &json!({"operationName": "x", "category": "Security", "level": "Warning", "caller": "me"}),
            0,
        );
        assert_eq!(
            (e.category.as_str(), e.level.as_str()),
            ("Security", "Warning")
        );
        assert_eq!(e.field(Field::Caller), Some("me"));
    }

    #[test]
    fn matching_takes_scopes_conditions_and_enabled() {
        let cat = json!({"field": "category", "equals": "administrative"});
        let ops = json!({"anyOf": [{"field": "operationName", "equals": "makedatabaseinaccessible"},
                                   {"field": "operationName", "equals": "MakeDatabaseAccessible"}]});
        let alert = |scopes: Value, extra: Vec<Value>| {
            let mut all = vec![cat.clone(), ops.clone()];
            all.extend(extra);
            ActivityLogAlert::parse(&alert_body(scopes, json!(all)), SUB).unwrap()
        };
        let down =
            ActivityEvent::from_entry(&server_log(), &db_entry("MakeDatabaseInaccessible"), 0);
        let up = ActivityEvent::from_entry(&server_log(), &db_entry("MakeDatabaseAccessible"), 0);
        let other =
            ActivityEvent::from_entry(&server_log(), &db_entry("Microsoft.Sql/servers/write"), 0);
        let a = alert(json!([rg("rg1")]), vec![]);
        assert!(a.matches(&down) && a.matches(&up) && !a.matches(&other));
        // Scopes: the subscription, the server (a prefix of the database), the database itself;
        // another group, or a resource whose name only starts the same, do not match.
        for s in [
            format!("/subscriptions/{SUB}"),
            server_log(),
            format!("{}/databases/DB1", server_log().to_uppercase()),
        ] {
            assert!(alert(json!([s]), vec![]).matches(&down), "{s}");
        }
        for s in [
            rg("rg2"),
            format!("{}/providers/Microsoft.Sql/servers/s", rg("rg1")),
        ] {
            assert!(!alert(json!([s]), vec![]).matches(&down), "{s}");
        }
        assert!(alert(json!([rg("rg2"), rg("rg1")]), vec![]).matches(&down));
        // Every field.
        let yes = [
            json!({"field": "resourceType", "equals": "microsoft.sql/servers/databases"}),
            json!({"field": "resourceId", "equals": down.resource_id.to_uppercase()}),
            json!({"field": "resourceGroup", "equals": "RG1"}),
            json!({"field": "resourceProvider", "equals": "Microsoft.Sql"}),
            json!({"field": "status", "containsAny": ["Failed", "Succeeded"]}),
            json!({"field": "level", "equals": "Informational"}),
            json!({"field": "subStatus", "equals": ""}),
        ];
        for c in yes {
            assert!(
                alert(json!([rg("rg1")]), vec![c.clone()]).matches(&down),
                "{c}"
            );
        }
        let no = [
            json!({"field": "resourceType", "equals": "Microsoft.Sql/servers"}),
            json!({"field": "status", "equals": "Failed"}),
            json!({"field": "level", "equals": "Error"}),
            json!({"field": "caller", "equals": "x"}),
            json!({"field": "category", "equals": "Security"}),
        ];
        for c in no {
            assert!(
                !alert(json!([rg("rg1")]), vec![c.clone()]).matches(&down),
                "{c}"
            );
        }
        let mut off = alert(json!([rg("rg1")]), vec![]);
        off.enabled = false;
        assert!(!off.matches(&down));
    }

    #[test]
    fn payloads_follow_the_schemas_and_carry_only_named_fields() {
        let mut entry = db_entry("MakeDatabaseInaccessible");
        entry["key"] = json!("secret material");
        let e = ActivityEvent::from_entry(&server_log(), &entry, 0);
        let props: Map<String, Value> = [("team".to_string(), json!("dba"))].into_iter().collect();
        let rule = format!(
            "{}/providers/Microsoft.Insights/activityLogAlerts/a1",
            rg("rg1")
        );
        let f = Firing {
            alert_rule_id: &rule,
            alert_rule: "a1",
            description: Some("d"),
            instance_id: "11111111-1111-4111-8111-111111111111",
            event_data_id: "22222222-2222-4222-8222-222222222222",
            fired_at: 60,
            webhook_properties: &props,
        };
        let c = common_alert_payload(&f, &e);
        assert_eq!(c["schemaId"], "azureMonitorCommonAlertSchema");
        let ess = &c["data"]["essentials"];
        assert_eq!(
            ess["alertId"],
            format!(
                "/subscriptions/{SUB}/providers/Microsoft.AlertsManagement/alerts/11111111-1111-4111-8111-111111111111"
            )
        );
        assert_eq!(ess["alertRule"], "a1");
        assert_eq!(ess["severity"], "Sev4");
        assert_eq!(ess["signalType"], "Activity Log");
        assert_eq!(ess["monitorCondition"], "Fired");
        assert_eq!(ess["monitoringService"], "Activity Log - Administrative");
        assert_eq!(ess["alertTargetIDs"], json!([e.resource_id]));
        assert_eq!(ess["configurationItems"], json!(["db1"]));
        assert_eq!(ess["firedDateTime"], "1970-01-01T00:01:00Z");
        let ctx = &c["data"]["alertContext"];
        assert_eq!(ctx["operationName"], "MakeDatabaseInaccessible");
        assert_eq!(ctx["status"], "Succeeded");
        assert_eq!(ctx["eventTimestamp"], "2026-12-05T10:00:00Z");
        assert_eq!(ctx["resourceId"], e.resource_id);
        assert_eq!(
            ctx["message"],
            "Database 'db1' is inaccessible: KeyDisabled"
        );
        assert_eq!(c["data"]["customProperties"]["team"], "dba");
        let l = legacy_alert_payload(&f, &e);
        assert_eq!(l["schemaId"], "Microsoft.Insights/activityLogs");
        assert_eq!(l["data"]["status"], "Activated");
        let log = &l["data"]["context"]["activityLog"];
        assert_eq!(log["operationName"], "MakeDatabaseInaccessible");
        assert_eq!(log["resourceGroupName"], "rg1");
        assert_eq!(log["subscriptionId"], SUB);
        assert_eq!(l["data"]["properties"]["team"], "dba");
        for p in [c, l] {
            assert!(!p.to_string().contains("secret material"));
        }
    }
}
