//! The context API (bearer token of an `http.users` user with the viewer role; a tenant the
//! caller does not see is not found):
//!
//! - `GET /v1/context/{resource}[?tenant=T][&related=N]`: the resource's facts and relations
//!   (and the facts of resources up to N ≤ 3 hops away);
//! - `GET /v1/context?fact=K[&path=P&equals=JSON][&tenant=T]`: resources with fact K (K in
//!   `context.index`), optionally whose value at P equals the JSON value;
//! - `GET /v1/context?related_to=R&relation=REL[&direction=in|out][&depth=N][&tenant=T]`: the
//!   resources REL links R to (`direction=in`: those that REL R, e.g. its dependents).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::Value;

use super::auth::{authorize, error, Auth, Role};
use crate::context::graph::{Direction, Graph};
use crate::context::redis::RedisStore;
use crate::context::view;
use crate::store::ResourceKey;

#[derive(Clone)]
pub struct Api {
    pub store: Arc<RedisStore>,
    pub graph: Arc<Graph>,
    pub auth: Arc<Auth>,
    pub indexed: Vec<String>,
}

/// The tenant asked for (default `default`) when the caller is a viewer who sees it; else the
/// error response (an unseen tenant is not found).
#[allow(clippy::result_large_err)]
fn viewer_tenant(
    api: &Api,
    headers: &HeaderMap,
    tenant: Option<String>,
) -> Result<String, Response> {
    let who = authorize(&api.auth, headers, Role::Viewer)?;
    let tenant = tenant.unwrap_or_else(|| "default".into());
    if !who.sees(&tenant) {
        return Err(error(
            StatusCode::NOT_FOUND,
            format!("no tenant {tenant} for this user"),
        ));
    }
    Ok(tenant)
}

#[derive(Deserialize)]
struct ShowQuery {
    tenant: Option<String>,
    related: Option<u32>,
}

async fn show(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(resource): Path<String>,
    Query(q): Query<ShowQuery>,
) -> Response {
    let tenant = match viewer_tenant(&api, &headers, q.tenant) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let key = ResourceKey::new(tenant, resource);
    match view::show(
        api.store.as_ref(),
        &api.graph,
        &key,
        q.related.unwrap_or(0).min(3),
    )
    .await
    {
        Ok(v) => Json(v).into_response(),
        Err(e) => super::auth::store_unavailable("the context API", e),
    }
}

#[derive(Deserialize)]
struct FindQuery {
    tenant: Option<String>,
    fact: Option<String>,
    path: Option<String>,
    equals: Option<String>,
    related_to: Option<String>,
    relation: Option<String>,
    direction: Option<String>,
    depth: Option<u32>,
    limit: Option<usize>,
}

async fn find(State(api): State<Api>, headers: HeaderMap, Query(q): Query<FindQuery>) -> Response {
    let tenant = match viewer_tenant(&api, &headers, q.tenant) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let equals = match q.equals.map(|e| serde_json::from_str::<Value>(&e)) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(e)) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("equals is not a JSON value: {e}"),
            )
        }
    };
    let direction = match q.direction.as_deref() {
        None | Some("out") => Direction::Out,
        Some("in") => Direction::In,
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("direction must be in or out, not {other:?}"),
            )
        }
    };
    let query = view::Query {
        tenant,
        fact: q.fact,
        path: q.path,
        equals,
        related_to: q.related_to,
        relation: q.relation,
        direction,
        depth: q.depth.unwrap_or(1),
        limit: q.limit.unwrap_or(100).clamp(1, 1000),
    };
    match view::query(&api.graph, &api.indexed, &query).await {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(m)) => error(StatusCode::BAD_REQUEST, m),
        Err(e) => super::auth::store_unavailable("the context API", e),
    }
}

pub fn router(api: Api) -> Router {
    Router::new()
        .route("/v1/context", get(find))
        .route("/v1/context/{resource}", get(show))
        .with_state(api)
}
