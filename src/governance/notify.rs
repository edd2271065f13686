//! Approval notifications: a webhook per approval rule (`notify:`), told when one of its approvals
//! is requested, escalated or expires, in Slack-compatible JSON (`{"text", "blocks"}`).
//!
//! Delivery never holds up a decision: [`Notifier::notify`] is called after the decision is
//! committed and returns at once; a background task posts with a bounded timeout and a few
//! retries, and at most [`MAX_IN_FLIGHT`] deliveries run at a time (beyond that a notification is
//! dropped). Every outcome is counted in `switchyard_approval_notifications_total{event, outcome}`.
//! Delivery is at most once per transition: a notification lost to a crash is not sent again.
//! The URL (Slack's carries its credential in the path) and header values are never logged; logs
//! name the rule and the webhook's host only.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::records::ApprovalData;
use crate::secret::SecretRef;
use crate::telemetry::METRICS;

/// Deliveries in flight at most; more are dropped (and counted).
pub const MAX_IN_FLIGHT: usize = 64;

/// `notify:` of an approval rule.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySpec {
    /// The webhook (http:// or https://). A Slack incoming-webhook URL is a credential: give it
    /// as `{env: VAR}` or `{file: PATH}`. Shown redacted, never logged.
    pub url: SecretRef,
    /// Extra request headers (e.g. `Authorization`); values may be `{env: VAR}` or `{file: PATH}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, SecretRef>,
    /// Time one attempt may take.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
    /// Attempts after the first when the webhook fails (connection error, timeout, 429, 5xx).
    #[serde(default = "default_retries")]
    pub retries: u32,
}

fn default_timeout() -> u64 {
    5
}
fn default_retries() -> u32 {
    2
}

impl NotifySpec {
    /// Problems, as (path, message).
    pub fn problems(&self, path: &str) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if let SecretRef::Value(u) = &self.url {
            if let Err(m) = check_url(u.expose()) {
                p.push((format!("{path}.url"), m));
            }
        }
        if !(1..=60).contains(&self.timeout_seconds) {
            p.push((
                format!("{path}.timeout_seconds"),
                "must be from 1 to 60".into(),
            ));
        }
        if self.retries > 5 {
            p.push((format!("{path}.retries"), "must be at most 5".into()));
        }
        for k in self.headers.keys() {
            if HeaderName::from_bytes(k.as_bytes()).is_err() {
                p.push((
                    format!("{path}.headers"),
                    format!("{k:?} is not a valid header name"),
                ));
            }
        }
        p
    }
}

/// An http(s) URL with a host; the message never repeats the URL.
fn check_url(u: &str) -> Result<reqwest::Url, String> {
    match reqwest::Url::parse(u) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host_str().is_some() => Ok(url),
        _ => Err("must be an http:// or https:// URL".into()),
    }
}

/// What happened to an approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Requested,
    Escalated,
    Expired,
}

impl Event {
    pub const ALL: [Event; 3] = [Event::Requested, Event::Escalated, Event::Expired];

    pub fn as_str(self) -> &'static str {
        match self {
            Event::Requested => "requested",
            Event::Escalated => "escalated",
            Event::Expired => "expired",
        }
    }

    /// The event an approval's status announces, if any is notified.
    pub fn of_status(status: &str) -> Option<Event> {
        match status {
            "pending" => Some(Event::Requested),
            "escalated" => Some(Event::Escalated),
            "expired" => Some(Event::Expired),
            _ => None,
        }
    }
}

/// The Slack-compatible message about `a`: a one-line `text` (what notification previews show)
/// and a section block with the approval's fields; the inbox link when `public_url` is known.
/// Text from agents or events, escaped for Slack's mrkdwn: `<!channel>` or `<url|label>` in a
/// reason stays text (no mass mention, no planted link).
fn esc(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub fn message(event: Event, a: &ApprovalData, public_url: Option<&str>) -> Value {
    let action = &a.action_record;
    let agents: Vec<&str> = action["agents"]
        .as_array()
        .map(|v| v.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let agent = agents.join(", ");
    let reason = action["reason"].as_str().unwrap_or("");
    let link = public_url.map(|u| {
        format!(
            "{}/inbox/approvals/{}",
            u.trim_end_matches('/'),
            a.approval_id
        )
    });
    let headline = match event {
        Event::Requested => "Approval requested",
        Event::Escalated => "Approval escalated",
        Event::Expired => "Approval expired",
    };
    let mut text = format!(
        "{headline}: {} on {} (tenant {})",
        esc(&a.action),
        esc(&a.resource),
        esc(&a.tenant)
    );
    if let Some(g) = &a.group {
        text.push_str(&format!(", for group {}", esc(g)));
    }
    if let Some(l) = &link {
        text.push_str(&format!(" <{l}|open in the inbox>"));
    }
    let mut fields = vec![
        ("Approval", a.approval_id.clone()),
        ("Action", a.action.clone()),
        ("Resource", a.resource.clone()),
        ("Tenant", a.tenant.clone()),
        ("Agent", agent),
        ("Reason", reason.to_string()),
        ("Status", a.status.clone()),
    ];
    if let Some(g) = &a.group {
        fields.push(("Group", format!("{g} (level {})", a.level)));
    }
    if let Some(r) = &a.rule {
        fields.push(("Rule", r.clone()));
    }
    if let Some(c) = a.confidence {
        fields.push(("Confidence", format!("{c}")));
    }
    // Slack takes at most 10 fields of at most 2000 characters each.
    let fields: Vec<Value> = fields
        .into_iter()
        .take(10)
        .map(|(k, v)| {
            let v: String = esc(&v).chars().take(1900).collect();
            json!({"type": "mrkdwn", "text": format!("*{k}*\n{v}")})
        })
        .collect();
    let mut blocks = vec![json!({
        "type": "section",
        "text": {"type": "mrkdwn", "text": format!("*{headline}*")},
        "fields": fields,
    })];
    if let Some(l) = link {
        blocks.push(json!({
            "type": "section",
            "text": {"type": "mrkdwn", "text": format!("<{l}|Open in the inbox>")},
        }));
    }
    json!({"text": text, "blocks": blocks})
}

/// One rule's webhook, resolved.
struct Target {
    url: reqwest::Url,
    headers: HeaderMap,
    timeout: Duration,
    retries: u32,
}

/// Sends approval notifications in the background.
pub struct Notifier {
    client: reqwest::Client,
    /// By rule name.
    targets: BTreeMap<String, Arc<Target>>,
    public_url: Option<String>,
    in_flight: Arc<Semaphore>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("rules", &self.targets.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Notifier {
    /// The notifier of the rules with `notify:`; none when no rule has one. An error names the
    /// setting that cannot be read (a missing environment variable, ...), never a secret.
    /// `specs`: (rule index, rule name, its `notify:`).
    pub fn from_specs(
        specs: Vec<(usize, String, &NotifySpec)>,
        public_url: Option<&str>,
    ) -> Result<Option<Arc<Notifier>>, String> {
        let mut targets = BTreeMap::new();
        for (i, name, n) in specs {
            let path = format!("governance.approvals.rules[{i}].notify");
            let url = n.url.resolve().map_err(|e| format!("{path}.url: {e}"))?;
            let url = check_url(url.expose()).map_err(|e| format!("{path}.url: {e}"))?;
            let mut headers = HeaderMap::new();
            for (k, v) in &n.headers {
                let name = HeaderName::from_bytes(k.as_bytes())
                    .map_err(|_| format!("{path}.headers: {k:?} is not a valid header name"))?;
                let v = v
                    .resolve()
                    .map_err(|e| format!("{path}.headers.{k}: {e}"))?;
                let mut value = HeaderValue::from_str(v.expose())
                    .map_err(|_| format!("{path}.headers.{k}: not a valid header value"))?;
                value.set_sensitive(true);
                headers.insert(name, value);
            }
            targets.insert(
                name,
                Arc::new(Target {
                    url,
                    headers,
                    timeout: Duration::from_secs(n.timeout_seconds.max(1)),
                    retries: n.retries,
                }),
            );
        }
        if targets.is_empty() {
            return Ok(None);
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            // A redirect could carry the request (and its headers) elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build the notifications' HTTP client: {e}"))?;
        for e in Event::ALL {
            for o in ["sent", "failed", "dropped"] {
                METRICS
                    .approval_notifications
                    .with_label_values(&[e.as_str(), o])
                    .inc_by(0);
            }
        }
        Ok(Some(Arc::new(Notifier {
            client,
            targets,
            public_url: public_url.map(String::from),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        })))
    }

    /// Tells the webhook of `a`'s rule (if it has one) about `a`'s current status, in the
    /// background; returns at once. Call it after the transition is committed.
    pub fn notify(&self, a: &ApprovalData) {
        let Some(event) = Event::of_status(&a.status) else {
            return;
        };
        let Some(target) = a.rule.as_deref().and_then(|r| self.targets.get(r)) else {
            return;
        };
        let count = move |outcome: &str| {
            METRICS
                .approval_notifications
                .with_label_values(&[event.as_str(), outcome])
                .inc()
        };
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            tracing::warn!(approval_id = %a.approval_id, event = event.as_str(), "Approval notification dropped: too many in flight.");
            count("dropped");
            return;
        };
        let body = message(event, a, self.public_url.as_deref());
        let (client, target) = (self.client.clone(), target.clone());
        let (id, rule) = (a.approval_id.clone(), a.rule.clone().unwrap_or_default());
        tokio::spawn(async move {
            let _permit = permit;
            let host = target.url.host_str().unwrap_or("").to_string();
            let mut last = String::new();
            for attempt in 0..=target.retries {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(500 << (attempt - 1).min(4))).await;
                }
                let sent = client
                    .post(target.url.clone())
                    .headers(target.headers.clone())
                    .header("x-switchyard-approval-id", &id)
                    .header("x-switchyard-event", event.as_str())
                    .timeout(target.timeout)
                    .json(&body)
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().is_success() => {
                        count("sent");
                        return;
                    }
                    Ok(r) => {
                        last = format!("HTTP {}", r.status().as_u16());
                        let s = r.status();
                        if !(s.is_server_error() || s.as_u16() == 429) {
                            break;
                        }
                    }
                    // Without the URL: it may carry a credential.
                    Err(e) => last = error_chain(&e.without_url()),
                }
            }
            count("failed");
            tracing::warn!(approval_id = %id, rule = %rule, webhook_host = %host, event = event.as_str(), error = %last,
                "Approval notification failed.");
        });
    }
}

/// An error with its causes (`error sending request: ... : connection refused`).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn text_from_agents_cannot_mention_or_link_in_slack() {
        let a: ApprovalData = serde_json::from_value(json!({
            "approval_id": "apr-1", "action_id": "a", "action": "rollback", "resource": "<!here>",
            "tenant": "default", "status": "pending", "requested_at": 0, "expires_at": 0,
            "action_record": {"agents": ["x"], "reason": "<!channel> <https://evil|Open in the inbox> & co"}}))
        .unwrap();
        let m = message(Event::Requested, &a, None).to_string();
        assert!(
            !m.contains("<!channel>") && !m.contains("<!here>") && !m.contains("<https://evil"),
            "{m}"
        );
        assert!(
            m.contains("&lt;!channel&gt;") && m.contains("&amp; co"),
            "{m}"
        );
    }

    use super::*;

    #[test]
    fn the_message_is_slack_shaped_with_the_approval_fields_and_link() {
        let a = ApprovalData {
            approval_id: "apr-1".into(),
            action: "rollback".into(),
            resource: "checkout".into(),
            tenant: "acme".into(),
            status: "escalated".into(),
            action_record: json!({"agents": ["sla-responder"], "reason": "p99 doubled"}),
            rule: Some("prod".into()),
            confidence: Some(0.4),
            level: 1,
            group: Some("leads".into()),
            ..Default::default()
        };
        let m = message(Event::Escalated, &a, Some("https://sy.example.com/"));
        let text = m["text"].as_str().unwrap();
        assert!(
            text.starts_with(
                "Approval escalated: rollback on checkout (tenant acme), for group leads"
            ),
            "{text}"
        );
        assert!(text.contains("https://sy.example.com/inbox/approvals/apr-1"));
        let fields: Vec<&str> = m["blocks"][0]["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["text"].as_str().unwrap())
            .collect();
        for want in [
            "*Approval*\napr-1",
            "*Agent*\nsla-responder",
            "*Reason*\np99 doubled",
            "*Status*\nescalated",
            "*Group*\nleads (level 1)",
            "*Confidence*\n0.4",
        ] {
            assert!(fields.contains(&want), "{want} in {fields:?}");
        }
        assert!(message(Event::Requested, &a, None)["blocks"][1].is_null());
    }

    #[test]
    fn urls_are_checked_without_repeating_them() {
        let spec: NotifySpec =
            serde_yaml::from_str("{url: 'ftp://user:pw@host/x', timeout_seconds: 0}").unwrap();
        let p = spec.problems("n");
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p.iter().all(|(_, m)| !m.contains("pw")));
        let ok: NotifySpec =
            serde_yaml::from_str("{url: 'https://hooks.example.com/T/B/x'}").unwrap();
        assert!(ok.problems("n").is_empty());
        assert_eq!((ok.timeout_seconds, ok.retries), (5, 2));
        let shown = serde_yaml::to_string(&ok).unwrap();
        assert!(
            !shown.contains("hooks.example.com"),
            "shown redacted: {shown}"
        );
    }
}
