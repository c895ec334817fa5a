//! Reports drains back to the API: the `conndrain.io/Drained` pod condition
//! (through the pods/status subresource, so `kubectl wait
//! --for=condition=conndrain.io/Drained` works) and the DrainStarted/Drained
//! events.
//!
//! Writes are rate-limited per pod while it drains and retried with backoff
//! on errors, until they land or the pod is gone: an API outage delays the
//! report but never loses it.

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, Resource as _, ResourceExt as _,
    api::{Patch, PatchParams},
    runtime::events::{Event, EventType, Recorder, Reporter as EventReporter},
};
use serde_json::json;

use super::Settings;
use crate::{drain::PodState, node::Node};

pub const CONDITION: &str = "conndrain.io/Drained";

#[derive(Clone)]
pub struct Reporter {
    client: Client,
    node: Arc<Node>,
    recorder: Recorder,
    min_write_interval: Duration,
}

impl Reporter {
    pub fn new(client: Client, node: Arc<Node>, settings: &Settings) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            EventReporter { controller: "conndrain".into(), instance: Some(settings.node_name.clone()) },
        );
        Self { client, node, recorder, min_write_interval: settings.min_write_interval }
    }

    /// Reports a refused value of one of the pod's `conndrain.io/`
    /// annotations: a Warning event whose note names the annotation, the
    /// value, what to write instead, and what the agent uses meanwhile.
    ///
    /// The action names the annotation: kube's `Recorder` takes an event
    /// with the same type, reason, action and object for a repeat of the
    /// last one (a series, whatever its note), so with one action for all,
    /// a second refused annotation of the pod was folded into the first and
    /// never shown.
    pub fn bad_annotation(&self, pod: &Pod, note: String) {
        let this = self.clone();
        let reference = pod.object_ref(&());
        let annotation = note.split([':', ' ']).next().unwrap_or_default();
        let action = format!("Configure {annotation}");
        tokio::spawn(async move {
            this.publish(EventType::Warning, "InvalidAnnotation", &action, &reference, note).await;
        });
    }

    /// Follows one terminating pod until its drain ends and is reported.
    pub fn start(&self, pod: Arc<Pod>, name: String) {
        let this = self.clone();
        tokio::spawn(async move { this.follow(&pod, &name).await });
    }

    async fn follow(&self, pod: &Pod, name: &str) {
        let Some(mut rx) = self.node.subscribe(name).await else { return };
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        let reference = pod.object_ref(&());
        let started = tokio::time::Instant::now();
        let Ok(view) = self.node.pod(name).await else { return };
        self.event(
            &reference,
            "DrainStarted",
            format!(
                "conndrain is draining the pod: {} active inbound flow(s); deadline in {:.0}s",
                view.active_flows,
                view.deadline_in_secs.unwrap_or(0.0)
            ),
        )
        .await;
        let mut last_message = String::new();
        loop {
            let Ok(view) = self.node.pod(name).await else { return };
            if view.state.is_final() {
                let (reason, outcome) = if view.state == PodState::Drained {
                    ("NoConnections", "no active connections and no new ones for the quiet period")
                } else {
                    ("DeadlineReached", "the deadline passed with connections still open")
                };
                let message = format!(
                    "{outcome}; {} active inbound flow(s) left, {} new since termination",
                    view.active_flows, view.new_flows_since_termination
                );
                if !self.condition(&api, pod, "True", reason, &message).await {
                    return;
                }
                self.event(
                    &reference,
                    "Drained",
                    format!(
                        "{reason} after {:.1}s; {} active inbound flow(s) left",
                        started.elapsed().as_secs_f64(),
                        view.active_flows
                    ),
                )
                .await;
                return;
            }
            let message = format!(
                "{} active inbound flow(s), {} idle, {} new since termination",
                view.active_flows, view.idle_flows, view.new_flows_since_termination
            );
            if message != last_message {
                if !self.condition(&api, pod, "False", "Draining", &message).await {
                    return;
                }
                last_message = message;
                // Rate limit: at most one progress write per interval; the final one is never delayed.
                let pause = tokio::time::sleep(self.min_write_interval);
                tokio::pin!(pause);
                loop {
                    tokio::select! {
                        () = &mut pause => break,
                        r = rx.changed() => {
                            if r.is_err() || rx.borrow().is_final() { break; }
                        }
                    }
                }
                continue;
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                () = tokio::time::sleep(self.min_write_interval) => {}
            }
        }
    }

    /// Writes the condition, retrying with backoff. False if the pod is gone.
    async fn condition(&self, api: &Api<Pod>, pod: &Pod, status: &str, reason: &str, message: &str) -> bool {
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let patch = json!({
            "status": {
                "conditions": [{
                    "type": CONDITION,
                    "status": status,
                    "reason": reason,
                    "message": message,
                    "lastTransitionTime": now,
                    "lastProbeTime": now,
                }]
            }
        });
        let name = pod.name_any();
        let mut backoff = Duration::from_millis(200);
        loop {
            match api.patch_status(&name, &PatchParams::default(), &Patch::Strategic(&patch)).await {
                Ok(_) => {
                    tracing::info!(pod = %name, status, reason, message, "condition written");
                    return true;
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    tracing::info!(pod = %name, "pod is gone; nothing to report");
                    return false;
                }
                Err(e) => {
                    tracing::warn!(pod = %name, error = %e, retry_in_ms = backoff.as_millis(), "writing condition");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Publishes a drain's event.
    async fn event(&self, reference: &k8s_openapi::api::core::v1::ObjectReference, reason: &str, note: String) {
        self.publish(EventType::Normal, reason, "Drain", reference, note).await;
    }

    /// Publishes an event; retried a few times, then given up with a log
    /// line (events are informative; the condition is what matters).
    async fn publish(
        &self,
        type_: EventType,
        reason: &str,
        action: &str,
        reference: &k8s_openapi::api::core::v1::ObjectReference,
        note: String,
    ) {
        let ev = Event { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary: None };
        let mut backoff = Duration::from_millis(200);
        for _ in 0..8 {
            match self.recorder.publish(&ev, reference).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(reason, error = %e, "publishing event");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
