//! `switchyard topics list|apply`: the topic definitions, and creating what is missing.

use std::time::Duration;

use super::ctx::Ctx;
use crate::kafka::admin_config;
use crate::topics::{self, ApplyOutcome};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: TopicsCommand,
}

#[derive(clap::Subcommand)]
pub enum TopicsCommand {
    /// Create missing topics from the definitions; report existing ones that differ. Idempotent.
    Apply,
    /// List the topic definitions.
    List,
}

pub async fn run(ctx: &Ctx, args: Args) -> Result<(), String> {
    let l = ctx.load_noting()?;
    let names = l.config.referenced_topics();
    let defs: Vec<_> = names.iter().filter_map(|n| l.topics.get(n)).collect();
    match args.command {
        TopicsCommand::List => {
            for d in defs {
                println!(
                    "{:<28} partitions={:<3} encoding={} schema={} key: {}",
                    d.name,
                    d.partitions,
                    d.encoding.as_str(),
                    d.schema.as_deref().unwrap_or("-"),
                    d.key
                );
            }
            Ok(())
        }
        TopicsCommand::Apply => {
            let results = topics::apply(
                &admin_config(&l.config.kafka),
                &defs,
                Duration::from_secs(15),
            )
            .await
            .map_err(|e| e.to_string())?;
            let (mut created, mut unchanged, mut differs) = (0, 0, 0);
            for (name, outcome) in results {
                match outcome {
                    ApplyOutcome::Created => {
                        created += 1;
                        println!("created   {name}");
                    }
                    ApplyOutcome::Unchanged => {
                        unchanged += 1;
                        println!("unchanged {name}");
                    }
                    ApplyOutcome::Differs(d) => {
                        differs += 1;
                        println!("differs   {name}: {}", d.join("; "));
                    }
                }
            }
            println!(
                "{created} created, {unchanged} unchanged, {differs} differ (left as they are)"
            );
            Ok(())
        }
    }
}
