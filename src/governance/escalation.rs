//! Escalation paths and who may decide an approval (pure).
//!
//! An approval rule may name a chain of approver groups, each with its time to decide. The
//! approval starts at level 0 (the first group); when a level's time passes undecided, the sweeper
//! moves it to the next group (status `escalated`, `level` + 1); the last group's timeout rejects
//! it (`expired`). [`may_decide`] is the one check of who may decide at the current level: the
//! approvals API enforces it, the inbox uses it to show or hide the buttons.

use serde::{Deserialize, Serialize};

use crate::records::ApprovalData;

/// One level of an escalation path: who decides, and for how long.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EscalationLevel {
    /// The approver group (users list it in `http.users[].groups`).
    pub group: String,
    /// Time the group has to decide, from the request (level 0) or the previous escalation.
    pub timeout_seconds: u64,
}

/// What the sweeper does with an open approval past its deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnDeadline {
    /// Move to `level`, which `group` decides (none: any approver, the legacy
    /// `on_timeout: escalate`), until `timeout_seconds` from now.
    Escalate {
        level: u32,
        group: Option<String>,
        timeout_seconds: u64,
    },
    /// Reject it as expired.
    Expire,
}

/// Who wants to decide, as the front doors know them.
#[derive(Debug, Clone, Copy)]
pub struct Decider<'a> {
    pub name: &'a str,
    /// Holds the approver role (or a higher one).
    pub approver: bool,
    /// Holds the admin role.
    pub admin: bool,
    /// The approver groups the user belongs to.
    pub groups: &'a [String],
}

/// Whether `who` may decide `a` now: admins always; otherwise approvers, and when the approval is
/// at a level of an escalation path (`group` set), only approvers of that group. Tenant scopes are
/// checked apart (an approval of a tenant the caller does not see does not exist for them).
/// The error is a sentence for the caller (a 403's message).
pub fn may_decide(who: &Decider<'_>, a: &ApprovalData) -> Result<(), String> {
    if who.admin {
        return Ok(());
    }
    if !who.approver {
        return Err(format!(
            "user {} may not decide approvals (needs role approver)",
            who.name
        ));
    }
    match &a.group {
        Some(g) if !who.groups.iter().any(|x| x == g) => Err(format!(
            "approval {} is at escalation level {} and only group {g} (or an admin) may decide it; user {} is not in that group",
            a.approval_id, a.level, who.name
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::governance::{ApprovalRule, ApprovalsConfig, OnTimeout};

    fn config() -> ApprovalsConfig {
        ApprovalsConfig {
            rules: vec![ApprovalRule {
                name: Some("prod".into()),
                escalation: vec![
                    EscalationLevel {
                        group: "oncall".into(),
                        timeout_seconds: 300,
                    },
                    EscalationLevel {
                        group: "leads".into(),
                        timeout_seconds: 900,
                    },
                ],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn approval(rule: Option<&str>, level: u32, group: Option<&str>) -> ApprovalData {
        ApprovalData {
            approval_id: "apr-1".into(),
            rule: rule.map(str::to_string),
            level,
            group: group.map(str::to_string),
            ..Default::default()
        }
    }

    #[test]
    fn an_escalation_path_moves_level_by_level_then_expires() {
        let c = config();
        assert_eq!(
            c.on_deadline(&approval(Some("prod"), 0, Some("oncall")), false),
            OnDeadline::Escalate {
                level: 1,
                group: Some("leads".into()),
                timeout_seconds: 900
            }
        );
        assert_eq!(
            c.on_deadline(&approval(Some("prod"), 1, Some("leads")), true),
            OnDeadline::Expire
        );
        // Without a path (or with a rule gone from the config): the legacy on_timeout.
        assert_eq!(
            c.on_deadline(&approval(Some("rules[3]"), 0, None), false),
            OnDeadline::Expire
        );
        let legacy = ApprovalsConfig {
            on_timeout: OnTimeout::Escalate,
            timeout_seconds: 60,
            ..Default::default()
        };
        assert_eq!(
            legacy.on_deadline(&approval(None, 0, None), false),
            OnDeadline::Escalate {
                level: 1,
                group: None,
                timeout_seconds: 60
            }
        );
        assert_eq!(
            legacy.on_deadline(&approval(None, 1, None), true),
            OnDeadline::Expire
        );
    }

    #[test]
    fn only_the_current_group_or_an_admin_decides() {
        let oncall = vec!["oncall".to_string()];
        let leads = vec!["leads".to_string()];
        let user = |groups: &'static [String], approver, admin| Decider {
            name: "u",
            approver,
            admin,
            groups,
        };
        let oncall: &'static [String] = oncall.leak();
        let leads: &'static [String] = leads.leak();
        let at_leads = approval(Some("prod"), 1, Some("leads"));
        assert!(may_decide(&user(oncall, true, false), &at_leads)
            .unwrap_err()
            .contains("only group leads"));
        assert!(may_decide(&user(leads, true, false), &at_leads).is_ok());
        assert!(may_decide(&user(&[], false, true), &at_leads).is_ok());
        assert!(may_decide(&user(leads, false, false), &at_leads)
            .unwrap_err()
            .contains("needs role approver"));
        // No escalation path: any approver.
        assert!(may_decide(&user(&[], true, false), &approval(None, 0, None)).is_ok());
    }
}
