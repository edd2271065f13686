//! Audit records of work that has no input record of its own (a model call, a tool call): sealed
//! into this process's own chain ([`Sealer::own_chain`]) and written in the background, each
//! optionally with a companion record on another topic (the call's transcript).

use std::sync::Arc;

use crate::audit::sealer::Sealer;
use crate::event::CloudEvent;
use crate::kafka::Producer;
use crate::records::{audit_event, AuditData, Emitter};

/// Writes audit records (and their companions) in the background.
#[derive(Clone)]
pub struct Recorder {
    pub emitter: Emitter,
    pub sealer: Arc<Sealer>,
    pub producer: Producer,
}

impl Recorder {
    /// Seals `audit` into the process's own chain and produces it, then `companion` (topic,
    /// event) when given. The caller does not wait; a failure is logged (`what` names the record
    /// in the log line).
    pub fn record(
        &self,
        stage: &'static str,
        what: &'static str,
        audit: AuditData,
        companion: Option<(String, CloudEvent)>,
    ) {
        let r = self.clone();
        let id = uuid::Uuid::new_v4().simple().to_string();
        tokio::spawn(async move {
            let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            let source = format!("switchyard/{stage}");
            let written = async {
                let ev = audit_event(&source, &[&audit.decision, &id], &audit, None, &now)
                    .map_err(|e| e.to_string())?;
                let (records, sealed) = r
                    .sealer
                    .seal(stage, &r.sealer.own_chain, &r.emitter, &[ev])
                    .await
                    .map_err(|e| e.to_string())?;
                for o in records.iter().chain(&sealed.seals) {
                    if let Err(e) = r.producer.send(o).await {
                        // The head moved past a seal that is not on the topic: the next seal
                        // writes it again.
                        sealed
                            .unsent
                            .store(true, std::sync::atomic::Ordering::Release);
                        return Err(e.to_string());
                    }
                }
                if let Some((topic, ev)) = companion {
                    let out = r.emitter.emit(&topic, &ev).map_err(|e| e.to_string())?;
                    r.producer.send(&out).await.map_err(|e| e.to_string())?;
                }
                Ok::<(), String>(())
            }
            .await;
            if let Err(e) = written {
                tracing::warn!(error = %e, record = what, "Could not write an audit record.");
            }
        });
    }
}
