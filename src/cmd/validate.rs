//! `switchyard validate`: checks the config and everything it refers to; prints every problem.

use super::ctx::Ctx;

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
    Ok(())
}
