//! `switchyard validate`: checks the config and everything it refers to; prints every problem.

use super::ctx::Ctx;
use crate::pattern::matches_any_or_empty;

#[derive(clap::Args)]
pub struct Args {}

pub fn run(ctx: &Ctx, _args: Args) -> Result<(), String> {
    let l = ctx.load()?;
    println!(
        "{} is valid: {} routes, {} agents, {} topic definitions, {} schemas",
        l.source,
        l.config.routes.len(),
        l.config.agents.len(),
        l.topics.iter().count(),
        l.schemas.names().count()
    );
    let agents: Vec<(&str, &[String])> = l
        .config
        .agents
        .iter()
        .map(|(n, a)| (n.as_str(), a.actions.as_slice()))
        .collect();
    for (item, m) in l.config.governance.unreachable_actions(&agents) {
        println!("warning: {item}: {m}");
    }
    let users: Vec<(&str, &[String])> = l
        .config
        .http
        .users
        .iter()
        .map(|u| (u.name.as_str(), u.groups.as_slice()))
        .collect();
    for (item, m) in l.config.governance.group_warnings(&users) {
        println!("warning: {item}: {m}");
    }
    // Shared tokens guard every tenant's approvals or the metrics; the per-user and ingest tokens
    // are refused under 16 characters, these two (older, and often set in scripts) are warned about.
    for (item, token) in [
        (
            "governance.approvals.token",
            l.config.governance.approvals.token.as_ref(),
        ),
        ("http.metrics_token", l.config.http.metrics_token.as_ref()),
    ] {
        if token.is_some_and(|t| t.expose().len() < 16) {
            println!("warning: {item}: shorter than 16 characters; use a long random one (e.g. `openssl rand -hex 16`)");
        }
    }
    let g = &l.config.governance;
    for (name, w) in &l.config.workflows {
        for (step, s) in &w.steps {
            let (Some(sv), Some(sup)) = (&s.supervise, &s.agent) else {
                continue;
            };
            for a in &sv.agents {
                let action = format!("delegate:{a}");
                if !g.access.is_empty()
                    && !g.access.iter().any(|r| {
                        matches_any_or_empty(&r.agents, sup)
                            && matches_any_or_empty(&r.actions, &action)
                    })
                {
                    println!("warning: workflows.{name}.steps.{step}: supervise.agents names {a}, but no governance.access rule lets {sup} delegate to it: every such delegation will be refused; add a rule such as {{ agents: [{sup}], actions: [\"delegate:{a}\"] }}");
                }
            }
        }
    }
    Ok(())
}
