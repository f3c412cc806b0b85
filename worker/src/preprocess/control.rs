//! `tandem.v1.WorkerControl` for the preprocess role: `GetStats` and `SetRoutes`.

use std::sync::Arc;
use std::time::Instant;

use tandem_proto::tandem::v1::worker_control_server::{WorkerControl, WorkerControlServer};
use tandem_proto::tandem::v1::{GetStatsRequest, SetRoutesRequest, SetRoutesResponse, WorkerStats};
use tonic::{Request, Response, Status};

use super::service::Service;

/// The control adapter.
#[derive(Debug, Clone)]
pub struct Control(pub Arc<Service>);

/// The generated server around [`Control`].
pub fn server(service: Arc<Service>) -> WorkerControlServer<Control> {
    WorkerControlServer::new(Control(service))
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
        let table = req
            .into_inner()
            .table
            .ok_or_else(|| Status::invalid_argument("SetRoutesRequest.table is required"))?;
        let applied_generation = self.0.router().apply(table, false)?;
        self.0.refresh_ready_metric();
        Ok(Response::new(SetRoutesResponse { applied_generation }))
    }
}
