//! Key rotation policies (`GET/PUT /keys/{name}/rotationpolicy`): the model, ISO 8601
//! durations, Azure's validation rules, and the pure scheduling rules — given a policy, a
//! version's times and `now`, what is due. No I/O.
//!
//! Durations with years or months are applied on the calendar (P1M after 31 January is the last
//! day of February); comparisons between durations (the minimums, "less than expiryTime") use
//! nominal lengths: a year is 365 days, a month 30 days.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::KvError;
use crate::time::DAY;

/// An ISO 8601 duration as rotation policies use them: `PnYnMnWnDTnHnMnS`, each part an
/// integer, at least one part, time parts after `T`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IsoDuration {
    /// Years.
    pub years: u32,
    /// Months.
    pub months: u32,
    /// Weeks.
    pub weeks: u32,
    /// Days.
    pub days: u32,
    /// Hours.
    pub hours: u32,
    /// Minutes.
    pub minutes: u32,
    /// Seconds.
    pub seconds: u32,
    text: String,
}

fn bad_duration(field: &str, text: &str) -> KvError {
    KvError::bad_parameter(format!(
        "{field} '{}' is not a valid ISO 8601 duration (for example P90D, P3M, P1Y10D, PT48H, P2W).",
        crate::ids::printable(text)
    ))
}

impl IsoDuration {
    /// Parses a duration; `field` names it in the error.
    pub fn parse(text: &str, field: &str) -> Result<Self, KvError> {
        let bad = || bad_duration(field, text);
        let rest = text.strip_prefix('P').ok_or_else(bad)?;
        let (date, time) = match rest.split_once('T') {
            Some((d, t)) => {
                if t.is_empty() {
                    return Err(bad());
                }
                (d, Some(t))
            }
            None => (rest, None),
        };
        let mut d = Self {
            years: 0,
            months: 0,
            weeks: 0,
            days: 0,
            hours: 0,
            minutes: 0,
            seconds: 0,
            text: text.to_string(),
        };
        let mut parts = 0;
        {
            let Self {
                years,
                months,
                weeks,
                days,
                ..
            } = &mut d;
            parts += parse_parts(
                date,
                &['Y', 'M', 'W', 'D'],
                &mut [years, months, weeks, days],
            )
            .ok_or_else(bad)?;
        }
        if let Some(t) = time {
            let Self {
                hours,
                minutes,
                seconds,
                ..
            } = &mut d;
            let n =
                parse_parts(t, &['H', 'M', 'S'], &mut [hours, minutes, seconds]).ok_or_else(bad)?;
            if n == 0 {
                return Err(bad());
            }
            parts += n;
        }
        if parts == 0 {
            return Err(bad());
        }
        Ok(d)
    }

    /// The text as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn fixed_seconds(&self) -> i64 {
        (i64::from(self.weeks) * 7 + i64::from(self.days)) * DAY
            + i64::from(self.hours) * 3600
            + i64::from(self.minutes) * 60
            + i64::from(self.seconds)
    }

    /// Nominal length in seconds (a year 365 days, a month 30 days), for comparisons.
    pub fn nominal_seconds(&self) -> i64 {
        (i64::from(self.years) * 365 + i64::from(self.months) * 30) * DAY + self.fixed_seconds()
    }

    /// `t` plus this duration, years and months on the calendar (UTC).
    pub fn add_to(&self, t: i64) -> i64 {
        shift_months(t, i64::from(self.years) * 12 + i64::from(self.months))
            .saturating_add(self.fixed_seconds())
    }

    /// `t` minus this duration, years and months on the calendar (UTC).
    pub fn sub_from(&self, t: i64) -> i64 {
        shift_months(t, -(i64::from(self.years) * 12 + i64::from(self.months)))
            .saturating_sub(self.fixed_seconds())
    }
}

/// Parses `nXnY…` with designators in `order` (each at most once, in order) into `slots`;
/// the number of parts, or `None` when malformed.
fn parse_parts(s: &str, order: &[char], slots: &mut [&mut u32]) -> Option<usize> {
    let mut next = 0usize;
    let mut num = String::new();
    let mut parts = 0;
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let pos = order.get(next..)?.iter().position(|&o| o == c)?;
        if num.is_empty() || num.len() > 9 {
            return None;
        }
        *slots[next + pos] = num.parse::<u32>().ok()?;
        next += pos + 1;
        num.clear();
        parts += 1;
    }
    num.is_empty().then_some(parts)
}

/// Moves `t` by `months` calendar months, clamping the day to the target month's length.
fn shift_months(t: i64, months: i64) -> i64 {
    if months == 0 {
        return t;
    }
    let Ok(dt) = time::OffsetDateTime::from_unix_timestamp(t) else {
        return t;
    };
    let total = i64::from(dt.year()) * 12 + i64::from(u8::from(dt.month())) - 1 + months;
    let (year, month0) = (total.div_euclid(12), total.rem_euclid(12));
    let (Ok(year), Ok(month)) = (
        i32::try_from(year),
        time::Month::try_from((month0 + 1) as u8),
    ) else {
        return t;
    };
    let day = dt.day().min(time::util::days_in_month(month, year));
    match time::Date::from_calendar_date(year, month, day) {
        Ok(date) => dt.replace_date(date).unix_timestamp(),
        Err(_) => t,
    }
}

impl Serialize for IsoDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for IsoDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s, "duration").map_err(|e| serde::de::Error::custom(e.message))
    }
}

/// What a lifetime action does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyAction {
    /// Create a new version.
    Rotate,
    /// Send a near-expiry event.
    Notify,
}

impl PolicyAction {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rotate => "Rotate",
            Self::Notify => "Notify",
        }
    }
}

/// When a lifetime action runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Trigger {
    /// This long after the newest version was created.
    TimeAfterCreate(IsoDuration),
    /// This long before the newest version expires.
    TimeBeforeExpiry(IsoDuration),
}

/// One lifetime action.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifetimeAction {
    /// The action.
    pub action: PolicyAction,
    /// Its trigger.
    pub trigger: Trigger,
}

/// A key's rotation policy as kagi keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationPolicy {
    /// Lifetime actions; empty means Azure's default (a Notify 30 days before expiry).
    pub lifetime_actions: Vec<LifetimeAction>,
    /// Applied to every new version: `exp = created + expiry_time`.
    pub expiry_time: Option<IsoDuration>,
    /// When the policy was first set.
    pub created: i64,
    /// When it last changed.
    pub updated: i64,
}

/// Days before expiry of the default Notify action (and of secrets' near-expiry events).
pub const DEFAULT_NOTIFY_DAYS: i64 = 30;

/// The smallest `expiryTime` Azure accepts: 28 days.
pub const MIN_EXPIRY: i64 = 28 * DAY;

/// The smallest trigger Azure accepts: rotation at least 7 days after creation and 7 days
/// before expiry; notification at least 7 days before expiry.
pub const MIN_TRIGGER: i64 = 7 * DAY;

fn default_notify() -> LifetimeAction {
    LifetimeAction {
        action: PolicyAction::Notify,
        trigger: Trigger::TimeBeforeExpiry(IsoDuration {
            years: 0,
            months: 0,
            weeks: 0,
            days: DEFAULT_NOTIFY_DAYS as u32,
            hours: 0,
            minutes: 0,
            seconds: 0,
            text: format!("P{DEFAULT_NOTIFY_DAYS}D"),
        }),
    }
}

// ----- wire shapes -----

/// Body of `PUT /keys/{name}/rotationpolicy`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RotationPolicyParameters {
    /// Ignored (output only).
    pub id: Option<String>,
    /// Lifetime actions.
    pub lifetime_actions: Option<Vec<WireLifetimeAction>>,
    /// Attributes.
    pub attributes: Option<WirePolicyAttributes>,
}

/// A lifetime action on the wire.
#[derive(Debug, Default, Deserialize)]
pub struct WireLifetimeAction {
    /// The trigger.
    pub trigger: Option<WireTrigger>,
    /// The action.
    pub action: Option<WireActionType>,
}

/// A trigger on the wire.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireTrigger {
    /// Duration after creation.
    pub time_after_create: Option<String>,
    /// Duration before expiry.
    pub time_before_expiry: Option<String>,
}

/// An action on the wire.
#[derive(Debug, Default, Deserialize)]
pub struct WireActionType {
    /// `Rotate` or `Notify` (case-insensitive).
    #[serde(rename = "type")]
    pub kind: Option<String>,
}

/// Policy attributes on the wire.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WirePolicyAttributes {
    /// ISO 8601 duration applied to new versions.
    pub expiry_time: Option<String>,
    /// Ignored (output only).
    pub created: Option<i64>,
    /// Ignored (output only).
    pub updated: Option<i64>,
}

fn days(secs: i64) -> String {
    format!("{} days", secs / DAY)
}

impl RotationPolicy {
    /// Validates a PUT body into a policy (400 BadParameter naming the problem). `created` is
    /// the first-set time of the policy being replaced, if any.
    pub fn from_parameters(
        p: RotationPolicyParameters,
        now: i64,
        created: Option<i64>,
    ) -> Result<Self, KvError> {
        let expiry_time = p
            .attributes
            .and_then(|a| a.expiry_time)
            .filter(|s| !s.is_empty())
            .map(|s| IsoDuration::parse(&s, "expiryTime"))
            .transpose()?;
        if let Some(e) = &expiry_time
            && e.nominal_seconds() < MIN_EXPIRY
        {
            return Err(KvError::bad_parameter(format!(
                "expiryTime {} is too short: it must be at least 28 days.",
                e.as_str()
            )));
        }
        let mut actions = Vec::new();
        for a in p.lifetime_actions.unwrap_or_default() {
            let kind = a
                .action
                .and_then(|t| t.kind)
                .ok_or_else(|| KvError::bad_parameter("A lifetime action needs action.type."))?;
            let action = if kind.eq_ignore_ascii_case("rotate") {
                PolicyAction::Rotate
            } else if kind.eq_ignore_ascii_case("notify") {
                PolicyAction::Notify
            } else {
                return Err(KvError::bad_parameter(format!(
                    "Unknown lifetime action type '{}': use Rotate or Notify.",
                    crate::ids::printable(&kind)
                )));
            };
            if actions.iter().any(|x: &LifetimeAction| x.action == action) {
                return Err(KvError::bad_parameter(format!(
                    "A rotation policy can have at most one {} action.",
                    action.as_str()
                )));
            }
            let t = a.trigger.unwrap_or_default();
            let trigger = match (t.time_after_create, t.time_before_expiry) {
                (Some(d), None) => {
                    Trigger::TimeAfterCreate(IsoDuration::parse(&d, "timeAfterCreate")?)
                }
                (None, Some(d)) => {
                    Trigger::TimeBeforeExpiry(IsoDuration::parse(&d, "timeBeforeExpiry")?)
                }
                (Some(_), Some(_)) => {
                    return Err(KvError::bad_parameter(
                        "A trigger has either timeAfterCreate or timeBeforeExpiry, not both.",
                    ));
                }
                (None, None) => {
                    return Err(KvError::bad_parameter(
                        "A lifetime action needs a trigger: timeAfterCreate or timeBeforeExpiry.",
                    ));
                }
            };
            let expiry = expiry_time.as_ref().map(IsoDuration::nominal_seconds);
            match (&action, &trigger) {
                (PolicyAction::Notify, Trigger::TimeAfterCreate(_)) => {
                    return Err(KvError::bad_parameter(
                        "timeAfterCreate applies only to Rotate; Notify takes timeBeforeExpiry.",
                    ));
                }
                (PolicyAction::Rotate, Trigger::TimeAfterCreate(d)) => {
                    if d.nominal_seconds() < MIN_TRIGGER {
                        return Err(KvError::bad_parameter(format!(
                            "timeAfterCreate {} is too short: a key can rotate at the earliest 7 \
                             days after creation.",
                            d.as_str()
                        )));
                    }
                    if let Some(e) = expiry
                        && d.nominal_seconds() > e - MIN_TRIGGER
                    {
                        return Err(KvError::bad_parameter(format!(
                            "timeAfterCreate {} must be at least 7 days shorter than expiryTime \
                             ({}).",
                            d.as_str(),
                            days(e)
                        )));
                    }
                }
                (PolicyAction::Rotate, Trigger::TimeBeforeExpiry(d)) => {
                    let Some(e) = expiry else {
                        return Err(KvError::bad_parameter(
                            "A Rotate action with timeBeforeExpiry needs attributes.expiryTime.",
                        ));
                    };
                    if d.nominal_seconds() < MIN_TRIGGER || d.nominal_seconds() > e - MIN_TRIGGER {
                        return Err(KvError::bad_parameter(format!(
                            "timeBeforeExpiry {} must be at least 7 days and less than expiryTime \
                             ({}) by at least 7 days.",
                            d.as_str(),
                            days(e)
                        )));
                    }
                }
                (PolicyAction::Notify, Trigger::TimeBeforeExpiry(d)) => {
                    if d.nominal_seconds() < MIN_TRIGGER {
                        return Err(KvError::bad_parameter(format!(
                            "timeBeforeExpiry {} is too short: notification must be at least 7 \
                             days before expiry.",
                            d.as_str()
                        )));
                    }
                    if let Some(e) = expiry
                        && d.nominal_seconds() >= e
                    {
                        return Err(KvError::bad_parameter(format!(
                            "timeBeforeExpiry {} must be less than expiryTime ({}).",
                            d.as_str(),
                            days(e)
                        )));
                    }
                }
            }
            actions.push(LifetimeAction { action, trigger });
        }
        Ok(Self {
            lifetime_actions: actions,
            expiry_time,
            created: created.unwrap_or(now),
            updated: now,
        })
    }

    /// The actions in force: the policy's, or Azure's default when it has none.
    pub fn effective_actions(&self) -> Vec<LifetimeAction> {
        if self.lifetime_actions.is_empty() {
            vec![default_notify()]
        } else {
            self.lifetime_actions.clone()
        }
    }

    fn action(&self, kind: PolicyAction) -> Option<Trigger> {
        self.effective_actions()
            .into_iter()
            .find(|a| a.action == kind)
            .map(|a| a.trigger)
    }

    /// The policy as the keys API answers it.
    pub fn to_wire(&self, id: &str) -> Value {
        let mut attributes = json!({"created": self.created, "updated": self.updated});
        if let Some(e) = &self.expiry_time {
            attributes["expiryTime"] = json!(e.as_str());
        }
        json!({
            "id": id,
            "lifetimeActions": actions_wire(&self.effective_actions()),
            "attributes": attributes,
        })
    }

    /// What a key without a policy answers: Azure's default (Notify 30 days before expiry).
    pub fn default_wire(id: &str) -> Value {
        json!({
            "id": id,
            "lifetimeActions": actions_wire(&[default_notify()]),
            "attributes": {},
        })
    }
}

fn actions_wire(actions: &[LifetimeAction]) -> Value {
    Value::Array(
        actions
            .iter()
            .map(|a| {
                let trigger = match &a.trigger {
                    Trigger::TimeAfterCreate(d) => json!({"timeAfterCreate": d.as_str()}),
                    Trigger::TimeBeforeExpiry(d) => json!({"timeBeforeExpiry": d.as_str()}),
                };
                json!({"trigger": trigger, "action": {"type": a.action.as_str()}})
            })
            .collect(),
    )
}

// ----- scheduling (pure) -----

/// The times of a key version that the rules look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VersionTimes {
    /// Creation time.
    pub created: i64,
    /// Expiry, if any.
    pub exp: Option<i64>,
}

/// When the key whose newest version is `newest` falls due for rotation under `policy`
/// (`None`: the policy does not rotate, or a timeBeforeExpiry rule meets a version without
/// exp). Derived from stored version times only, so it is its own durable record: once a
/// rotation has committed, the new version's `created` moves the next due time forward.
pub fn rotation_due_at(policy: Option<&RotationPolicy>, newest: VersionTimes) -> Option<i64> {
    match policy?.action(PolicyAction::Rotate)? {
        Trigger::TimeAfterCreate(d) => Some(d.add_to(newest.created)),
        Trigger::TimeBeforeExpiry(d) => newest.exp.map(|exp| d.sub_from(exp)),
    }
}

/// Whether a rotation is due at `now`. However many periods have passed since it fell due,
/// one rotation makes it not due again (the new version is created at `now`).
pub fn rotation_due(policy: Option<&RotationPolicy>, newest: VersionTimes, now: i64) -> bool {
    rotation_due_at(policy, newest).is_some_and(|t| now >= t)
}

/// The expiry of a version created at `created` under `policy`: `created + expiryTime`.
pub fn new_version_expiry(policy: Option<&RotationPolicy>, created: i64) -> Option<i64> {
    policy?.expiry_time.as_ref().map(|d| d.add_to(created))
}

/// When a key version expiring at `exp` is "near expiry": the Notify action's
/// timeBeforeExpiry, Azure's default 30 days without a policy (or with an empty one), never
/// when the policy has actions but no Notify.
pub fn key_near_expiry_at(policy: Option<&RotationPolicy>, exp: i64) -> Option<i64> {
    match policy {
        None => Some(exp - DEFAULT_NOTIFY_DAYS * DAY),
        Some(p) => match p.action(PolicyAction::Notify)? {
            Trigger::TimeBeforeExpiry(d) => Some(d.sub_from(exp)),
            Trigger::TimeAfterCreate(_) => None,
        },
    }
}

/// When a secret version expiring at `exp` is near expiry: 30 days before.
pub fn secret_near_expiry_at(exp: i64) -> i64 {
    exp - DEFAULT_NOTIFY_DAYS * DAY
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> IsoDuration {
        IsoDuration::parse(s, "t").unwrap()
    }

    fn params(v: Value) -> RotationPolicyParameters {
        serde_json::from_value(v).unwrap()
    }

    fn policy(v: Value) -> Result<RotationPolicy, KvError> {
        RotationPolicy::from_parameters(params(v), 1000, None)
    }

    #[test]
    fn durations_parse() {
        assert_eq!(d("P90D").nominal_seconds(), 90 * DAY);
        assert_eq!(d("P2W").nominal_seconds(), 14 * DAY);
        assert_eq!(d("PT48H").nominal_seconds(), 48 * 3600);
        assert_eq!(d("P1Y10D").nominal_seconds(), 375 * DAY);
        assert_eq!(d("P3M").nominal_seconds(), 90 * DAY);
        assert_eq!(d("P1DT1H1M1S").nominal_seconds(), DAY + 3661);
        assert_eq!(d("P1W2D").nominal_seconds(), 9 * DAY);
        assert_eq!(d("PT30M").nominal_seconds(), 1800);
        for bad in [
            "",
            "P",
            "PT",
            "90D",
            "P90",
            "P-1D",
            "P1.5D",
            "P1D1Y",
            "P1DT",
            "PT1D",
            "P1H",
            "p90d",
            "P90DX",
            "P1YY",
            "P 1D",
            "P9999999999D",
            "P1D2D",
        ] {
            let e = IsoDuration::parse(bad, "expiryTime").unwrap_err();
            assert_eq!(e.status(), 400, "{bad}");
        }
    }

    #[test]
    fn calendar_arithmetic() {
        // 2026-01-31T00:00:00Z + P1M = 2026-02-28, + P1Y = 2027-01-31.
        let jan31 = 1_769_817_600;
        assert_eq!(d("P1M").add_to(jan31), jan31 + 28 * DAY);
        assert_eq!(d("P1Y").add_to(jan31), jan31 + 365 * DAY);
        assert_eq!(d("P1M").sub_from(jan31), jan31 - 31 * DAY);
        assert_eq!(d("P30D").add_to(jan31), jan31 + 30 * DAY);
        assert_eq!(d("P1MT1H").add_to(jan31), jan31 + 28 * DAY + 3600);
    }

    #[test]
    fn validation() {
        let ok = policy(json!({"lifetimeActions": [
            {"trigger": {"timeAfterCreate": "P30D"}, "action": {"type": "Rotate"}},
            {"trigger": {"timeBeforeExpiry": "P7D"}, "action": {"type": "notify"}}],
            "attributes": {"expiryTime": "P90D"}}))
        .unwrap();
        assert_eq!(ok.lifetime_actions.len(), 2);
        assert_eq!(ok.expiry_time.as_ref().unwrap().as_str(), "P90D");
        // Azure's own SDK tests: Rotate after P2M, or Notify P60D, without expiryTime.
        assert!(
            policy(json!({"lifetimeActions": [
            {"trigger": {"timeAfterCreate": "P2M"}, "action": {"type": "Rotate"}}]}))
            .is_ok()
        );
        assert!(
            policy(json!({"lifetimeActions": [
            {"trigger": {"timeBeforeExpiry": "P60D"}, "action": {"type": "Notify"}}]}))
            .is_ok()
        );
        // Empty policy: accepted, means the default.
        let empty = policy(json!({"lifetimeActions": [], "attributes": {}})).unwrap();
        assert_eq!(empty.effective_actions(), vec![default_notify()]);
        let bad = [
            json!({"attributes": {"expiryTime": "P27D"}}),
            json!({"attributes": {"expiryTime": "90 days"}}),
            json!({"lifetimeActions": [{"trigger": {"timeAfterCreate": "P6D"}, "action": {"type": "Rotate"}}]}),
            json!({"lifetimeActions": [{"trigger": {"timeAfterCreate": "P30D"}, "action": {"type": "Explode"}}]}),
            json!({"lifetimeActions": [{"trigger": {"timeAfterCreate": "P30D"}}]}),
            json!({"lifetimeActions": [{"action": {"type": "Rotate"}}]}),
            json!({"lifetimeActions": [{"trigger": {"timeAfterCreate": "P30D", "timeBeforeExpiry": "P30D"}, "action": {"type": "Rotate"}}]}),
            json!({"lifetimeActions": [{"trigger": {"timeAfterCreate": "P30D"}, "action": {"type": "Notify"}}]}),
            // Rotate before expiry needs an expiryTime.
            json!({"lifetimeActions": [{"trigger": {"timeBeforeExpiry": "P30D"}, "action": {"type": "Rotate"}}]}),
            json!({"lifetimeActions": [{"trigger": {"timeBeforeExpiry": "P90D"}, "action": {"type": "Rotate"}}], "attributes": {"expiryTime": "P90D"}}),
            json!({"lifetimeActions": [{"trigger": {"timeBeforeExpiry": "P90D"}, "action": {"type": "Notify"}}], "attributes": {"expiryTime": "P90D"}}),
            json!({"lifetimeActions": [{"trigger": {"timeBeforeExpiry": "P6D"}, "action": {"type": "Notify"}}]}),
            json!({"lifetimeActions": [{"trigger": {"timeAfterCreate": "P85D"}, "action": {"type": "Rotate"}}], "attributes": {"expiryTime": "P90D"}}),
            json!({"lifetimeActions": [
                {"trigger": {"timeAfterCreate": "P30D"}, "action": {"type": "Rotate"}},
                {"trigger": {"timeAfterCreate": "P40D"}, "action": {"type": "Rotate"}}]}),
            json!({"lifetimeActions": [
                {"trigger": {"timeBeforeExpiry": "P30D"}, "action": {"type": "Notify"}},
                {"trigger": {"timeBeforeExpiry": "P40D"}, "action": {"type": "Notify"}}]}),
        ];
        for b in bad {
            let e = policy(b.clone()).unwrap_err();
            assert_eq!(e.status(), 400, "{b}");
        }
    }

    #[test]
    fn wire_round_trip() {
        let p = policy(json!({"lifetimeActions": [
            {"trigger": {"timeAfterCreate": "P30D"}, "action": {"type": "rotate"}}],
            "attributes": {"expiryTime": "P90D"}}))
        .unwrap();
        let w = p.to_wire("https://v.localhost:8443/keys/k/rotationpolicy");
        assert_eq!(w["lifetimeActions"][0]["action"]["type"], "Rotate");
        assert_eq!(
            w["lifetimeActions"][0]["trigger"]["timeAfterCreate"],
            "P30D"
        );
        assert_eq!(w["attributes"]["expiryTime"], "P90D");
        assert_eq!(w["attributes"]["created"], 1000);
        let stored: RotationPolicy =
            serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(stored, p);
        let dflt = RotationPolicy::default_wire("x");
        assert_eq!(
            dflt["lifetimeActions"][0]["trigger"]["timeBeforeExpiry"],
            "P30D"
        );
        assert_eq!(dflt["lifetimeActions"][0]["action"]["type"], "Notify");
    }

    #[test]
    fn a_year_of_30_day_rotation() {
        let p = policy(json!({"lifetimeActions": [
            {"trigger": {"timeAfterCreate": "P30D"}, "action": {"type": "Rotate"}}],
            "attributes": {"expiryTime": "P90D"}}))
        .unwrap();
        let t0 = 1_767_225_600;
        let mut newest = VersionTimes {
            created: t0,
            exp: None,
        };
        let mut rotations = Vec::new();
        // The scheduler runs every hour for a year; each rotation creates the version at `now`.
        let mut now = t0;
        while now <= t0 + 365 * DAY {
            if rotation_due(Some(&p), newest, now) {
                rotations.push(now);
                newest = VersionTimes {
                    created: now,
                    exp: new_version_expiry(Some(&p), now),
                };
                // Running again at the same instant does nothing.
                assert!(!rotation_due(Some(&p), newest, now));
            }
            now += 3600;
        }
        let expected: Vec<i64> = (1..=12).map(|k| t0 + k * 30 * DAY).collect();
        assert_eq!(rotations, expected);
        assert_eq!(newest.exp, Some(t0 + 360 * DAY + 90 * DAY));
    }

    #[test]
    fn missed_periods_rotate_once() {
        let p = policy(json!({"lifetimeActions": [
            {"trigger": {"timeAfterCreate": "P30D"}, "action": {"type": "Rotate"}}]}))
        .unwrap();
        let newest = VersionTimes {
            created: 0,
            exp: None,
        };
        // Down for 100 days: due now, once; after the one rotation, due again 30 days later.
        assert!(rotation_due(Some(&p), newest, 100 * DAY));
        let after = VersionTimes {
            created: 100 * DAY,
            exp: None,
        };
        assert!(!rotation_due(Some(&p), after, 100 * DAY));
        assert_eq!(rotation_due_at(Some(&p), after), Some(130 * DAY));
    }

    #[test]
    fn before_expiry_and_notify() {
        let p = policy(json!({"lifetimeActions": [
            {"trigger": {"timeBeforeExpiry": "P10D"}, "action": {"type": "Rotate"}},
            {"trigger": {"timeBeforeExpiry": "P14D"}, "action": {"type": "Notify"}}],
            "attributes": {"expiryTime": "P60D"}}))
        .unwrap();
        let v = VersionTimes {
            created: 0,
            exp: Some(60 * DAY),
        };
        assert_eq!(rotation_due_at(Some(&p), v), Some(50 * DAY));
        let no_exp = VersionTimes {
            created: 0,
            exp: None,
        };
        assert_eq!(rotation_due_at(Some(&p), no_exp), None);
        assert_eq!(key_near_expiry_at(Some(&p), 60 * DAY), Some(46 * DAY));
        assert_eq!(key_near_expiry_at(None, 60 * DAY), Some(30 * DAY));
        let rotate_only = policy(json!({"lifetimeActions": [
            {"trigger": {"timeAfterCreate": "P30D"}, "action": {"type": "Rotate"}}]}))
        .unwrap();
        assert_eq!(key_near_expiry_at(Some(&rotate_only), 60 * DAY), None);
        assert_eq!(rotation_due_at(None, v), None);
        assert_eq!(new_version_expiry(Some(&p), 5), Some(5 + 60 * DAY));
        assert_eq!(new_version_expiry(Some(&rotate_only), 5), None);
    }
}
