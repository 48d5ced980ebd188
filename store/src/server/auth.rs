//! The etcd Auth service: turning auth on and off, Authenticate, and managing users, roles
//! and permissions. Changes go through Raft (see `crate::auth`); reads are linearizable.

use std::sync::Arc;

use flotilla_proto::etcdserverpb::auth_server::Auth;
use flotilla_proto::etcdserverpb::*;
use flotilla_proto::flotillapb::{auth_change, command, command_result, AuthChange, AuthEnable};
use rand::RngCore;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::auth::{hash_password, password_matches};
use crate::error::EtcdError;
use crate::member::Member;

/// Password hashes and checks running at once (bcrypt is slow by design; Authenticate must
/// not be a way to take every core).
const MAX_CONCURRENT_BCRYPT: usize = 2;

static BCRYPT: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_CONCURRENT_BCRYPT);

pub struct AuthService {
    pub member: Arc<Member>,
}

/// Runs bcrypt work on the blocking pool, at most `MAX_CONCURRENT_BCRYPT` at once. The slot
/// is held until the work ends, even if the client gave up meanwhile; a request that cannot
/// get a slot within the request timeout is refused.
async fn bcrypt<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    let permit = tokio::time::timeout(crate::member::REQUEST_TIMEOUT, BCRYPT.acquire())
        .await
        .map_err(|_| EtcdError::Timeout)?
        .map_err(|_| EtcdError::Stopped)?;
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        work()
    })
    .await
    .map_err(|e| Status::from(EtcdError::Internal(e.to_string())))
}

/// A hash of nothing anyone knows, checked for unknown users so that a login costs the same
/// whether the user exists or not.
fn dummy_hash(cost: u32) -> String {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY
        .get_or_init(|| {
            let mut secret = [0u8; 16];
            rand::thread_rng().fill_bytes(&mut secret);
            hash_password(&format!("{secret:?}"), cost).unwrap_or_default()
        })
        .clone()
}

impl AuthService {
    fn header(&self) -> Option<ResponseHeader> {
        Some(self.member.header(self.member.mvcc.current_revision()))
    }

    /// Proposes a change on behalf of the request's user (root only, when auth is on).
    async fn change(
        &self,
        metadata: &MetadataMap,
        change: auth_change::Change,
    ) -> Result<Option<ResponseHeader>, Status> {
        let auth = self.member.auth_info(metadata).await?;
        self.member.mvcc.auth().check_admin(Some(&auth))?;
        let request = command::Request::AuthChange(AuthChange {
            change: Some(change),
        });
        match self
            .member
            .propose(Member::client_command(request, auth))
            .await?
        {
            command_result::Result::AuthChange(_) => Ok(self.header()),
            _ => {
                Err(EtcdError::Internal("state machine answered a different request".into()).into())
            }
        }
    }

    /// A linearizable look at the auth state for the request's user; `allowed` decides
    /// whether a non-root user may see what it asks for.
    async fn read(
        &self,
        metadata: &MetadataMap,
        allowed: impl FnOnce(&crate::auth::AuthState, &str) -> bool,
    ) -> Result<Arc<crate::auth::AuthState>, Status> {
        let auth = self.member.auth_info(metadata).await?;
        self.member.linearizable_barrier().await?;
        let state = self.member.mvcc.auth();
        if let Err(e) = state.check_admin(Some(&auth)) {
            if e != EtcdError::PermissionDenied || !allowed(&state, &auth.user) {
                return Err(e.into());
            }
        }
        Ok(state)
    }

    async fn hashed(&self, password: String, hashed: String) -> Result<String, Status> {
        if !hashed.is_empty() {
            return Ok(hashed);
        }
        let cost = self.member.limits.bcrypt_cost;
        Ok(bcrypt(move || hash_password(&password, cost)).await??)
    }
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn auth_enable(
        &self,
        r: Request<AuthEnableRequest>,
    ) -> Result<Response<AuthEnableResponse>, Status> {
        let mut token_key = vec![0u8; 32];
        rand::thread_rng().fill_bytes(&mut token_key);
        let header = self
            .change(
                r.metadata(),
                auth_change::Change::Enable(AuthEnable { token_key }),
            )
            .await?;
        Ok(Response::new(AuthEnableResponse { header }))
    }

    async fn auth_disable(
        &self,
        r: Request<AuthDisableRequest>,
    ) -> Result<Response<AuthDisableResponse>, Status> {
        let header = self
            .change(
                r.metadata(),
                auth_change::Change::Disable(r.get_ref().clone()),
            )
            .await?;
        Ok(Response::new(AuthDisableResponse { header }))
    }

    async fn auth_status(
        &self,
        _r: Request<AuthStatusRequest>,
    ) -> Result<Response<AuthStatusResponse>, Status> {
        self.member.linearizable_barrier().await?;
        let state = self.member.mvcc.auth();
        Ok(Response::new(AuthStatusResponse {
            header: self.header(),
            enabled: state.enabled(),
            auth_revision: state.revision(),
        }))
    }

    /// Checks the password against the latest state (after a read barrier) and signs a
    /// token for the current auth revision.
    async fn authenticate(
        &self,
        r: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        let req = r.into_inner();
        self.member.linearizable_barrier().await?;
        let mut state = self.member.mvcc.auth();
        if !state.enabled() {
            return Err(EtcdError::AuthNotEnabled.into());
        }
        // A restored cluster gets a new token key from its leader within a second or so.
        let deadline = tokio::time::Instant::now() + crate::member::REQUEST_TIMEOUT;
        while state.needs_token_key() {
            if tokio::time::Instant::now() >= deadline {
                return Err(EtcdError::Timeout.into());
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            state = self.member.mvcc.auth();
        }
        let known = state.password_hash(&req.name).map(str::to_string);
        let cost = self.member.limits.bcrypt_cost;
        let password = req.password;
        let matched = bcrypt(move || match known {
            Some(hash) => password_matches(&password, &hash),
            None => {
                let _ = password_matches(&password, &dummy_hash(cost));
                false
            }
        })
        .await?;
        if !matched {
            return Err(EtcdError::AuthFailed.into());
        }
        let expiry = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            + self.member.limits.auth_token_ttl;
        Ok(Response::new(AuthenticateResponse {
            header: self.header(),
            token: state.sign_token(&req.name, expiry.as_secs()),
        }))
    }

    async fn user_add(
        &self,
        r: Request<AuthUserAddRequest>,
    ) -> Result<Response<AuthUserAddResponse>, Status> {
        let (metadata, _, mut req) = r.into_parts();
        if req.name.is_empty() {
            return Err(EtcdError::UserEmpty.into());
        }
        let auth = self.member.auth_info(&metadata).await?;
        self.member.mvcc.auth().check_admin(Some(&auth))?;
        let no_password = req.options.as_ref().is_some_and(|o| o.no_password);
        if !no_password {
            req.hashed_password = self
                .hashed(std::mem::take(&mut req.password), req.hashed_password)
                .await?;
        }
        req.password.clear();
        let header = self
            .change(&metadata, auth_change::Change::UserAdd(req))
            .await?;
        Ok(Response::new(AuthUserAddResponse { header }))
    }

    async fn user_get(
        &self,
        r: Request<AuthUserGetRequest>,
    ) -> Result<Response<AuthUserGetResponse>, Status> {
        let name = r.get_ref().name.clone();
        let state = self.read(r.metadata(), |_, user| user == name).await?;
        Ok(Response::new(AuthUserGetResponse {
            header: self.header(),
            roles: state.user_roles(&r.get_ref().name)?,
        }))
    }

    async fn user_list(
        &self,
        r: Request<AuthUserListRequest>,
    ) -> Result<Response<AuthUserListResponse>, Status> {
        let state = self.read(r.metadata(), |_, _| false).await?;
        Ok(Response::new(AuthUserListResponse {
            header: self.header(),
            users: state.user_names(),
        }))
    }

    async fn user_delete(
        &self,
        r: Request<AuthUserDeleteRequest>,
    ) -> Result<Response<AuthUserDeleteResponse>, Status> {
        let header = self
            .change(
                r.metadata(),
                auth_change::Change::UserDelete(r.get_ref().clone()),
            )
            .await?;
        Ok(Response::new(AuthUserDeleteResponse { header }))
    }

    async fn user_change_password(
        &self,
        r: Request<AuthUserChangePasswordRequest>,
    ) -> Result<Response<AuthUserChangePasswordResponse>, Status> {
        let (metadata, _, mut req) = r.into_parts();
        let auth = self.member.auth_info(&metadata).await?;
        self.member.mvcc.auth().check_admin(Some(&auth))?;
        req.hashed_password = self
            .hashed(std::mem::take(&mut req.password), req.hashed_password)
            .await?;
        let header = self
            .change(&metadata, auth_change::Change::UserChangePassword(req))
            .await?;
        Ok(Response::new(AuthUserChangePasswordResponse { header }))
    }

    async fn user_grant_role(
        &self,
        r: Request<AuthUserGrantRoleRequest>,
    ) -> Result<Response<AuthUserGrantRoleResponse>, Status> {
        let header = self
            .change(
                r.metadata(),
                auth_change::Change::UserGrantRole(r.get_ref().clone()),
            )
            .await?;
        Ok(Response::new(AuthUserGrantRoleResponse { header }))
    }

    async fn user_revoke_role(
        &self,
        r: Request<AuthUserRevokeRoleRequest>,
    ) -> Result<Response<AuthUserRevokeRoleResponse>, Status> {
        let header = self
            .change(
                r.metadata(),
                auth_change::Change::UserRevokeRole(r.get_ref().clone()),
            )
            .await?;
        Ok(Response::new(AuthUserRevokeRoleResponse { header }))
    }

    async fn role_add(
        &self,
        r: Request<AuthRoleAddRequest>,
    ) -> Result<Response<AuthRoleAddResponse>, Status> {
        if r.get_ref().name.is_empty() {
            return Err(EtcdError::RoleEmpty.into());
        }
        let header = self
            .change(
                r.metadata(),
                auth_change::Change::RoleAdd(r.get_ref().clone()),
            )
            .await?;
        Ok(Response::new(AuthRoleAddResponse { header }))
    }

    async fn role_get(
        &self,
        r: Request<AuthRoleGetRequest>,
    ) -> Result<Response<AuthRoleGetResponse>, Status> {
        let role = r.get_ref().role.clone();
        let state = self
            .read(r.metadata(), |state, user| {
                state
                    .user_roles(user)
                    .is_ok_and(|roles| roles.contains(&role))
            })
            .await?;
        Ok(Response::new(AuthRoleGetResponse {
            header: self.header(),
            perm: state.role_permissions(&r.get_ref().role)?,
        }))
    }

    async fn role_list(
        &self,
        r: Request<AuthRoleListRequest>,
    ) -> Result<Response<AuthRoleListResponse>, Status> {
        let state = self.read(r.metadata(), |_, _| false).await?;
        Ok(Response::new(AuthRoleListResponse {
            header: self.header(),
            roles: state.role_names(),
        }))
    }

    async fn role_delete(
        &self,
        r: Request<AuthRoleDeleteRequest>,
    ) -> Result<Response<AuthRoleDeleteResponse>, Status> {
        let header = self
            .change(
                r.metadata(),
                auth_change::Change::RoleDelete(r.get_ref().clone()),
            )
            .await?;
        Ok(Response::new(AuthRoleDeleteResponse { header }))
    }

    async fn role_grant_permission(
        &self,
        r: Request<AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<AuthRoleGrantPermissionResponse>, Status> {
        let header = self
            .change(
                r.metadata(),
                auth_change::Change::RoleGrantPermission(r.get_ref().clone()),
            )
            .await?;
        Ok(Response::new(AuthRoleGrantPermissionResponse { header }))
    }

    async fn role_revoke_permission(
        &self,
        r: Request<AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<AuthRoleRevokePermissionResponse>, Status> {
        let header = self
            .change(
                r.metadata(),
                auth_change::Change::RoleRevokePermission(r.get_ref().clone()),
            )
            .await?;
        Ok(Response::new(AuthRoleRevokePermissionResponse { header }))
    }
}
