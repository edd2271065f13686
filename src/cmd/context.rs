//! `switchyard context show|query`: one resource's shared context with its relations, and
//! queries by fact (the fact index) or by relation. JSON with `--json`.

use serde_json::Value;

use super::ctx::Ctx;
use crate::context::graph::{Direction, Graph};
use crate::context::redis::RedisStore;
use crate::context::view;
use crate::store::{RedisConn, ResourceKey};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: ContextCommand,
}

#[derive(clap::Subcommand)]
pub enum ContextCommand {
    /// A resource's facts and relations (and with --related N, the facts of resources up to N
    /// hops away).
    Show {
        resource: String,
        #[arg(long, default_value = "default")]
        tenant: String,
        #[arg(long, default_value_t = 0)]
        related: u32,
        #[arg(long)]
        json: bool,
    },
    /// Resources by fact (`--fact sla --path active --equals true`; the fact must be in
    /// context.index) or by relation (`--related-to payments --relation depends_on --direction in`:
    /// its dependents).
    Query {
        #[arg(long)]
        fact: Option<String>,
        #[arg(long)]
        path: Option<String>,
        /// A JSON value (`true`, `"v42"`, `3`); plain text is taken as a string.
        #[arg(long)]
        equals: Option<String>,
        #[arg(long)]
        related_to: Option<String>,
        #[arg(long)]
        relation: Option<String>,
        #[arg(long, value_parser = ["out", "in"], default_value = "out")]
        direction: String,
        #[arg(long, default_value_t = 1)]
        depth: u32,
        #[arg(long, default_value = "default")]
        tenant: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(ctx: &Ctx, args: Args) -> Result<(), String> {
    let l = ctx.load_noting()?;
    let cfg = &l.config;
    let conn = RedisConn::from_config(&cfg.redis).map_err(|e| e.to_string())?;
    let graph = Graph::new(
        conn.clone(),
        &cfg.redis.key_prefix,
        cfg.context.relations.clone(),
    );
    match args.command {
        ContextCommand::Show {
            resource,
            tenant,
            related,
            json,
        } => {
            let store = RedisStore::new(conn, &cfg.redis.key_prefix, cfg.context.clone());
            let key = ResourceKey::new(tenant, resource);
            let v = view::show(&store, &graph, &key, related.min(3))
                .await
                .map_err(|e| e.to_string())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                print!("{}", human_show(&v));
            }
            Ok(())
        }
        ContextCommand::Query {
            fact,
            path,
            equals,
            related_to,
            relation,
            direction,
            depth,
            tenant,
            limit,
            json,
        } => {
            let q = view::Query {
                tenant,
                fact,
                path,
                equals: equals.map(|e| serde_json::from_str(&e).unwrap_or(Value::String(e))),
                related_to,
                relation,
                direction: if direction == "in" {
                    Direction::In
                } else {
                    Direction::Out
                },
                depth,
                limit,
            };
            let v = view::query(&graph, &cfg.context.index, &q)
                .await
                .map_err(|e| e.to_string())??;
            if json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                let list = v["resources"].as_array().cloned().unwrap_or_default();
                for r in &list {
                    let rest = if r.get("value").is_some() {
                        format!(
                            "{}  (by {}, {})",
                            r["value"],
                            r["by"].as_str().unwrap_or(""),
                            r["at"].as_str().unwrap_or("")
                        )
                    } else {
                        format!("depth {}", r["depth"])
                    };
                    println!("{:<24} {rest}", r["resource"].as_str().unwrap_or(""));
                }
                println!("{} resources", list.len());
            }
            Ok(())
        }
    }
}

fn human_show(v: &Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} ({}) at context version {}",
        v["resource"].as_str().unwrap_or(""),
        v["tenant"].as_str().unwrap_or(""),
        v["version"]
    );
    for (k, f) in v["facts"].as_object().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {k:<28} {}  (by {}, {})",
            f["value"],
            f["by"].as_str().unwrap_or(""),
            f["at"].as_str().unwrap_or("")
        );
    }
    for r in v["relations"].as_array().into_iter().flatten() {
        let arrow = if r["direction"] == "in" { "<-" } else { "->" };
        let _ = writeln!(
            out,
            "  {arrow} {} {}",
            r["relation"].as_str().unwrap_or(""),
            r["resource"].as_str().unwrap_or("")
        );
    }
    for (rel, m) in v["related"].as_object().into_iter().flatten() {
        for (r, x) in m.as_object().into_iter().flatten() {
            let _ = writeln!(
                out,
                "  {rel} {r} (depth {}, version {}):",
                x["depth"], x["version"]
            );
            for (k, val) in x["facts"].as_object().into_iter().flatten() {
                let _ = writeln!(out, "      {k:<24} {val}");
            }
        }
    }
    out
}
