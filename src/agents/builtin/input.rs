//! Reading a task's input for built-in agents.

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde_json::Value;

use crate::agents::model::{AgentError, AgentRequest};
use crate::records::AgentResponse;

/// The event's time (now when it has none or it does not parse).
pub fn event_time(req: &AgentRequest) -> DateTime<Utc> {
    req.event
        .time
        .as_deref()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(Utc::now)
}

/// The event's data (null when it has none).
pub fn data(req: &AgentRequest) -> &Value {
    req.event.data.as_ref().unwrap_or(&Value::Null)
}

/// A string field of a JSON object.
pub fn str_field<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str)
}

/// An answer that is ready now.
pub fn ready(r: AgentResponse) -> BoxFuture<'static, Result<AgentResponse, AgentError>> {
    Box::pin(std::future::ready(Ok(r)))
}
