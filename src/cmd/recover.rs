//! `switchyard recover`: rebuilds Redis from the Kafka topics after Redis lost its data (see
//! [`crate::recover`]); running instances resume once it wrote the new epoch marker.

use std::time::Duration;

use super::ctx::Ctx;
use crate::audit::RedisChainStore;
use crate::context::redis::RedisStore;
use crate::recover::{recover, Stores};
use crate::store::RedisConn;

#[derive(clap::Args)]
pub struct Args {
    /// Rebuild even though Redis still has its epoch marker.
    #[arg(long)]
    pub force: bool,
    /// Stop reading a topic after this long without a record.
    #[arg(long, default_value_t = 3000)]
    pub idle_timeout_ms: u64,
}

pub async fn run(ctx: &Ctx, args: Args) -> Result<(), String> {
    let l = ctx.load_noting()?;
    let cfg = &l.config;
    let conn = RedisConn::from_config(&cfg.redis).map_err(|e| e.to_string())?;
    let prefix = &cfg.redis.key_prefix;
    let chains = RedisChainStore::new(conn.clone(), prefix);
    let resources = crate::app::resource_store_unguarded(&l, conn.clone());
    let context = RedisStore::new(conn.clone(), prefix, cfg.context.clone());
    let stores = Stores {
        conn: &conn,
        prefix,
        chains: &chains,
        resources: resources.as_ref(),
        context: &context,
    };
    let r = recover(
        &l,
        &stores,
        &cfg.resolve,
        args.force,
        Duration::from_millis(args.idle_timeout_ms),
    )
    .await?;
    println!(
        "recovered from Kafka: {} audit chains, {} pending approvals ({} whose action went out left decided), {} approved awaiting their release ({} of whose release records the sweeper writes again; {} approved over a day ago without their action on the topic left as they are), {} resources' resolve state ({} written over what was there, {} kept as they were), {} facts ({} resources' context kept as it was); new epoch {}",
        r.chains, r.pending_approvals, r.approved_unrecorded, r.approved_unsent, r.releases_again, r.approved_too_old, r.resources, r.rebuilt_over, r.kept, r.facts, r.contexts_kept, r.epoch
    );
    Ok(())
}
