//! `tandem.v1.WorkerControl` for the preprocess role: `GetStats` and `SetRoutes`, behind the
//! control token when one is set ([`crate::common::control_auth`]).

use std::sync::Arc;
use std::time::Instant;

use tandem_proto::tandem::v1::worker_control_server::{WorkerControl, WorkerControlServer};
use tandem_proto::tandem::v1::{GetStatsRequest, SetRoutesRequest, SetRoutesResponse, WorkerStats};
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use super::service::Service;
use crate::common::control_auth::{self, ControlAuth};

/// The control adapter.
#[derive(Debug, Clone)]
pub struct Control(pub Arc<Service>);

/// The generated server around [`Control`], taking only the calls `auth` lets through.
pub fn server(
    service: Arc<Service>,
    auth: ControlAuth,
) -> InterceptedService<WorkerControlServer<Control>, ControlAuth> {
    control_auth::server(Control(service), auth)
}

#[tonic::async_trait]
impl WorkerControl for Control {
    async fn get_stats(
        &self,
        _: Request<GetStatsRequest>,
    ) -> Result<Response<WorkerStats>, Status> {
        Ok(Response::new(self.0.stats(Instant::now())))
    }

    async fn set_routes(
        &self,
        req: Request<SetRoutesRequest>,
    ) -> Result<Response<SetRoutesResponse>, Status> {
        let SetRoutesRequest { table, replace } = req.into_inner();
        let table =
            table.ok_or_else(|| Status::invalid_argument("SetRoutesRequest.table is required"))?;
        if replace {
            tracing::warn!(
                generation = table.generation,
                "routing table replaced whatever its generation (the operator found one it did not push)"
            );
        }
        let applied_generation = self.0.router().apply(table, replace)?;
        self.0.refresh_ready_metric();
        Ok(Response::new(SetRoutesResponse { applied_generation }))
    }
}
