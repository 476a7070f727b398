//! `Servers`: the control-plane replicas serving this fleet, for operators
//! allowed to read.

use std::sync::Arc;

use hotswap_common::pb;
use tonic::{Request, Response, Status};

use super::Context;
use super::convert::server_to_pb;
use crate::error::ApiError;
use crate::replicas;

pub struct ServersService {
    ctx: Arc<Context>,
}

impl ServersService {
    pub fn new(ctx: Arc<Context>) -> Self {
        Self { ctx }
    }
}

#[tonic::async_trait]
impl pb::servers_server::Servers for ServersService {
    async fn list_servers(
        &self,
        request: Request<pb::ListServersRequest>,
    ) -> Result<Response<pb::ListServersResponse>, Status> {
        self.ctx.reader(&request)?;
        let all = replicas::list_sorted(&*self.ctx.replicas).map_err(ApiError::from)?;
        Ok(Response::new(pb::ListServersResponse {
            servers: all.iter().map(server_to_pb).collect(),
        }))
    }

    async fn get_server(
        &self,
        request: Request<pb::GetServerRequest>,
    ) -> Result<Response<pb::Server>, Status> {
        self.ctx.reader(&request)?;
        let name = request.into_inner().name;
        let replica = replicas::find(&*self.ctx.replicas, &name).map_err(ApiError::from)?;
        Ok(Response::new(server_to_pb(&replica)))
    }
}
