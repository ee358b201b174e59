//! The gRPC face of the coordinator: `WorkerService` and `JobService` from
//! `proto/dnd.proto`, the health service, auth and limits; and `serve`.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use dnd_core::JobName;
use dnd_pipeline::JobSpec;
use dnd_proto::auth::RequireToken;
use dnd_proto::convert::stage_progress_from_proto;
use dnd_proto::transport::MAX_MESSAGE_BYTES;
use dnd_proto::v1::job_service_server::{JobService, JobServiceServer};
use dnd_proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use dnd_proto::v1::{self as pb};
use dnd_proto::{
    BearerToken, ClientConfig, LeasedTask, PROTOCOL_VERSION, ServerConfig, check_version,
};

use crate::coordinator::{Coordinator, CoordinatorError};
use crate::scheduler::{Event, JobView, Phase};

/// Longest a lease request may wait for work.
const MAX_LEASE_WAIT: Duration = Duration::from_secs(30);
/// Longest user-controlled strings accepted in requests.
const MAX_NAME_LEN: usize = 128;
const MAX_ERROR_LEN: usize = 16 << 10;
const MAX_SPEC_LEN: usize = 1 << 20;

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Self {
        match &e {
            CoordinatorError::NotFound(_) => Status::not_found(e.to_string()),
            CoordinatorError::Refused(_) => Status::failed_precondition(e.to_string()),
            CoordinatorError::NotCommitted { .. } => Status::failed_precondition(e.to_string()),
            _ if e.is_user_error() => Status::invalid_argument(e.to_string()),
            _ => Status::internal(e.to_string()),
        }
    }
}

fn bounded<'a>(field: &str, value: &'a str, max: usize) -> Result<&'a str, Status> {
    if value.len() > max {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes long; the limit is {max}",
            value.len()
        )));
    }
    Ok(value)
}

fn phase_to_pb(phase: Phase) -> pb::JobState {
    match phase {
        Phase::Probing => pb::JobState::Probing,
        Phase::Merging | Phase::Describing => pb::JobState::Describing,
        Phase::Compacting => pb::JobState::Compacting,
        Phase::Succeeded => pb::JobState::Succeeded,
        Phase::Failed => pb::JobState::Failed,
        Phase::Cancelled => pb::JobState::Cancelled,
    }
}

pub fn status_to_pb(view: &JobView, location: &str) -> pb::JobStatus {
    pb::JobStatus {
        version: PROTOCOL_VERSION,
        job: view.job.clone(),
        state: phase_to_pb(view.phase) as i32,
        tasks_total: view.counts.total,
        tasks_queued: view.counts.queued,
        tasks_leased: view.counts.leased,
        tasks_committed: view.counts.committed,
        tasks_failed: view.counts.failed,
        tasks_retried: view.counts.retried,
        stages: view
            .stages
            .iter()
            .map(|(stage, done, total)| pb::StageProgress {
                stage: stage.name().to_string(),
                done: *done,
                total: *total,
            })
            .collect(),
        error: view.error.clone(),
        location: location.to_string(),
    }
}

fn event_to_pb(job: &str, e: &Event, status: Option<pb::JobStatus>) -> pb::JobEvent {
    pb::JobEvent {
        version: PROTOCOL_VERSION,
        seq: e.seq,
        unix_ms: e.unix_ms,
        kind: e.kind.clone(),
        task_id: e.task.clone(),
        attempt: e.attempt,
        worker: e.worker.clone(),
        message: e.message.clone(),
        status: status.or_else(|| Some(pb::JobStatus { job: job.into(), ..Default::default() })),
    }
}

#[derive(Clone)]
pub struct Services {
    coordinator: Arc<Coordinator>,
}

impl Services {
    /// The lease as the worker gets it.
    fn task_to_pb(&self, leased: &crate::scheduler::Leased) -> pb::Task {
        let task = LeasedTask {
            job: JobName::new(leased.job.clone()),
            task: leased.task.clone(),
            attempt: leased.lease.attempt,
            token: leased.lease.token,
            attempt_name: format!("attempt-{}-{:x}", leased.lease.attempt, leased.lease.token),
            lease_deadline_unix_ms: leased.lease.deadline_ms,
            store: self.coordinator.store().to_string(),
        };
        pb::Task::from(&task)
    }
}

#[tonic::async_trait]
impl WorkerService for Services {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinReply>, Status> {
        let r = request.into_inner();
        check_version(r.version)?;
        let name = bounded("name", &r.name, MAX_NAME_LEN)?;
        let name = if name.is_empty() { "worker" } else { name };
        let settings = self.coordinator.settings();
        Ok(Response::new(pb::JoinReply {
            version: PROTOCOL_VERSION,
            worker_id: self.coordinator.join(name),
            lease_ms: settings.lease.as_millis() as u32,
            heartbeat_ms: settings.heartbeat.as_millis() as u32,
        }))
    }

    async fn lease(
        &self,
        request: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseReply>, Status> {
        let r = request.into_inner();
        check_version(r.version)?;
        let worker = bounded("worker_id", &r.worker_id, MAX_NAME_LEN * 2)?;
        let wait = Duration::from_millis(r.wait_ms as u64).min(MAX_LEASE_WAIT);
        let task = self
            .coordinator
            .lease(worker, wait)
            .await
            .map(|(leased, _plan)| self.task_to_pb(&leased));
        Ok(Response::new(pb::LeaseReply { version: PROTOCOL_VERSION, task }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        let r = request.into_inner();
        check_version(r.version)?;
        let progress = stage_progress_from_proto(&r.progress);
        let reply = match self.coordinator.heartbeat(&r.job, &r.task_id, r.token, &progress) {
            Ok(deadline) => pb::HeartbeatReply {
                version: PROTOCOL_VERSION,
                keep_going: true,
                lease_deadline_unix_ms: deadline,
            },
            Err(_) => pb::HeartbeatReply {
                version: PROTOCOL_VERSION,
                keep_going: false,
                lease_deadline_unix_ms: 0,
            },
        };
        Ok(Response::new(reply))
    }

    async fn complete(
        &self,
        request: Request<pb::CompleteRequest>,
    ) -> Result<Response<pb::CompleteReply>, Status> {
        let r = request.into_inner();
        check_version(r.version)?;
        self.coordinator.complete(&r.job, &r.task_id, r.token).await?;
        let next = if r.lease_next {
            let worker = bounded("worker_id", &r.worker_id, MAX_NAME_LEN * 2)?;
            self.coordinator
                .lease(worker, Duration::ZERO)
                .await
                .map(|(leased, _)| self.task_to_pb(&leased))
        } else {
            None
        };
        Ok(Response::new(pb::CompleteReply { version: PROTOCOL_VERSION, accepted: true, next }))
    }

    async fn fail(
        &self,
        request: Request<pb::FailRequest>,
    ) -> Result<Response<pb::FailReply>, Status> {
        let r = request.into_inner();
        check_version(r.version)?;
        let error: String = r.error.chars().take(MAX_ERROR_LEN).collect();
        let retried = self.coordinator.fail(&r.job, &r.task_id, r.token, &error, r.handed_back)?;
        Ok(Response::new(pb::FailReply { version: PROTOCOL_VERSION, retried }))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for Services {
    async fn submit(
        &self,
        request: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitReply>, Status> {
        let r = request.into_inner();
        check_version(r.version)?;
        let text = bounded("spec_toml", &r.spec_toml, MAX_SPEC_LEN)?;
        let spec = JobSpec::from_toml(text, "the submitted job")
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let submitted = self.coordinator.submit(spec, 0.0).await?;
        Ok(Response::new(pb::SubmitReply {
            version: PROTOCOL_VERSION,
            job: submitted.job,
            tasks_resumed: submitted.tasks_resumed as u32,
            tasks_total: submitted.tasks_total as u32,
        }))
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let r = request.into_inner();
        check_version(r.version)?;
        let job = r.job;
        let (first, location) = self.coordinator.status(&job).await?;
        let coordinator = self.coordinator.clone();
        // Subscribe before taking the log, so no event falls between the two.
        let mut events = coordinator.subscribe();
        let past = coordinator.events(&job);
        let stream = async_stream(move |tx| async move {
            let status = |c: &Coordinator| c.view(&job).map(|v| status_to_pb(&v, &location));
            let mut last_seq = None;
            for e in &past {
                last_seq = Some(e.seq);
                if tx.send(Ok(event_to_pb(&job, e, None))).await.is_err() {
                    return;
                }
            }
            let mut last_status = Some(status_to_pb(&first, &location));
            let snapshot = pb::JobEvent {
                version: PROTOCOL_VERSION,
                kind: "status".into(),
                status: last_status.clone(),
                ..Default::default()
            };
            if tx.send(Ok(snapshot)).await.is_err() || first.phase.is_final() {
                return;
            }
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    received = events.recv() => match received {
                        Ok((j, e)) if j.as_str() == job => {
                            if last_seq.is_some_and(|s| e.seq <= s) { continue; }
                            last_seq = Some(e.seq);
                            let now = status(&coordinator);
                            let ended = now.as_ref().is_some_and(|s| is_final(s.state));
                            last_status = now.clone();
                            if tx.send(Ok(event_to_pb(&job, &e, now))).await.is_err() || ended { return; }
                        }
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(_) => return,
                    },
                    _ = tick.tick() => {
                        let now = status(&coordinator);
                        if now != last_status {
                            let ended = now.as_ref().is_some_and(|s| is_final(s.state));
                            last_status = now.clone();
                            let event = pb::JobEvent { version: PROTOCOL_VERSION, kind: "progress".into(), status: now, unix_ms: crate::coordinator::now_ms(), ..Default::default() };
                            if tx.send(Ok(event)).await.is_err() || ended { return; }
                        }
                    }
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        let r = request.into_inner();
        check_version(r.version)?;
        let (view, location) = self.coordinator.status(&r.job).await?;
        Ok(Response::new(status_to_pb(&view, &location)))
    }

    async fn cancel(
        &self,
        request: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        let r = request.into_inner();
        check_version(r.version)?;
        let view = self.coordinator.cancel(&r.job).await?;
        let location =
            self.coordinator.job_location(&r.job).map(|l| l.to_string()).unwrap_or_default();
        Ok(Response::new(status_to_pb(&view, &location)))
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListReply>, Status> {
        check_version(request.into_inner().version)?;
        let jobs = self
            .coordinator
            .jobs()
            .iter()
            .map(|v| {
                status_to_pb(
                    v,
                    &self
                        .coordinator
                        .job_location(&v.job)
                        .map(|l| l.to_string())
                        .unwrap_or_default(),
                )
            })
            .collect();
        Ok(Response::new(pb::ListReply { version: PROTOCOL_VERSION, jobs }))
    }
}

fn is_final(state: i32) -> bool {
    matches!(
        pb::JobState::try_from(state),
        Ok(pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled)
    )
}

/// A stream fed by a spawned task through a channel.
fn async_stream<F, Fut>(producer: F) -> EventStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::JobEvent, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(producer(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// A running coordinator server.
pub struct Served {
    pub addr: SocketAddr,
    pub task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

/// Serves the coordinator on `listener` until `shutdown` resolves: both services behind
/// the token, plus the standard health service (no token, for probes).
pub async fn serve(
    coordinator: Arc<Coordinator>,
    listener: TcpListener,
    token: BearerToken,
    config: &ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Served, dnd_proto::TransportError> {
    let addr = listener.local_addr().map_err(|e| dnd_proto::TransportError::Listen {
        addr: "the given listener".into(),
        reason: e.to_string(),
    })?;
    let services = Services { coordinator };
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<WorkerServiceServer<Services>>().await;
    health.set_serving::<JobServiceServer<Services>>().await;
    let auth = RequireToken(token);
    let workers = WorkerServiceServer::new(services.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let jobs = JobServiceServer::new(services)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let router = config
        .builder()?
        .add_service(health_service)
        .add_service(InterceptedService::new(workers, auth.clone()))
        .add_service(InterceptedService::new(jobs, auth));
    let task = tokio::spawn(
        router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown),
    );
    Ok(Served { addr, task })
}

/// Serves the coordinator on a free loopback port with a fresh token until `shutdown`
/// resolves (an embedded dissection, the benches' workers): the server and how a client
/// on this machine reaches it.
pub async fn serve_loopback(
    coordinator: Arc<Coordinator>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(Served, ClientConfig), dnd_proto::TransportError> {
    let addr = "127.0.0.1:0";
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        dnd_proto::TransportError::Listen { addr: addr.into(), reason: e.to_string() }
    })?;
    let token = BearerToken::random();
    let served =
        serve(coordinator, listener, token.clone(), &ServerConfig::default(), shutdown).await?;
    let client = ClientConfig { url: format!("http://{}", served.addr), token, tls_ca: None };
    Ok((served, client))
}
