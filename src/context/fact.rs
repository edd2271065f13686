//! [`Fact`]: one fact of a resource's shared context as stored.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A fact as stored: the value plus who wrote it, when, and for which task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fact {
    pub value: Value,
    pub by: String,
    pub task_id: String,
    pub at: String,
}
