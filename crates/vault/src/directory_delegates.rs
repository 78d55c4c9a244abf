//! Principals, the token endpoint, role definitions and assignments, and locks, as the
//! platform serves them: each call is answered by
//! the directory (`kagi-directory`), which the platform owns.

use std::collections::HashMap;
use std::net::IpAddr;

use kagi_core::KvError;
use kagi_identity::Principal;
use serde_json::Value;

use crate::{Platform, TokenGrant, TokenRequestError};

impl Platform {
    /// Validates a bearer token for this platform's resource and returns its principal.
    pub fn authenticate(&self, bearer: &str) -> Result<Principal, KvError> {
        self.directory.authenticate(bearer)
    }

    /// The JSON Web Key Set of the token service.
    pub fn jwks(&self) -> Value {
        self.directory.jwks()
    }

    /// Creates a service principal with a client secret (shown once).
    pub async fn create_service_principal(
        &self,
        caller: &Principal,
        name: &str,
    ) -> Result<Value, KvError> {
        self.directory.create_service_principal(caller, name).await
    }

    /// Creates a user who signs in with `upn` and `password` (the resource-owner password
    /// grant). The password is kept only as an Argon2id hash.
    pub async fn create_user(
        &self,
        caller: &Principal,
        upn: &str,
        display_name: &str,
        password: &str,
    ) -> Result<Value, KvError> {
        self.directory
            .create_user(caller, upn, display_name, password)
            .await
    }

    /// Deletes a user; their tokens stop working on the next request.
    pub async fn delete_user(&self, caller: &Principal, object_id: &str) -> Result<(), KvError> {
        self.directory.delete_user(caller, object_id).await
    }

    /// Registers an X.509 certificate (PEM, or base64 of DER) as a credential of a service
    /// principal: `ClientCertificateCredential` then signs its token requests with the key.
    pub async fn add_service_principal_certificate(
        &self,
        caller: &Principal,
        object_id: &str,
        certificate: &str,
    ) -> Result<Value, KvError> {
        self.directory
            .add_service_principal_certificate(caller, object_id, certificate)
            .await
    }

    /// Graph's `GET /v1.0/servicePrincipals[?$filter=…]` (service principals and managed
    /// identities).
    pub fn graph_service_principals(
        &self,
        caller: &Principal,
        filter: Option<&str>,
    ) -> Result<Value, KvError> {
        self.directory.graph_service_principals(caller, filter)
    }

    /// Graph's `GET /v1.0/users[?$filter=…]`.
    pub fn graph_users(&self, caller: &Principal, filter: Option<&str>) -> Result<Value, KvError> {
        self.directory.graph_users(caller, filter)
    }

    /// Graph's `GET /v1.0/servicePrincipals/{id}` (`users` false) or `/v1.0/users/{id}`.
    pub fn graph_get(&self, caller: &Principal, users: bool, id: &str) -> Result<Value, KvError> {
        self.directory.graph_get(caller, users, id)
    }

    /// Graph's `GET /v1.0/me` (400 for an application's token, as Graph answers).
    pub fn graph_me(&self, caller: &Principal) -> Result<Value, KvError> {
        self.directory.graph_me(caller)
    }

    /// Graph's `POST /v1.0/directoryObjects/getByIds`.
    pub fn graph_get_by_ids(&self, caller: &Principal, body: &Value) -> Result<Value, KvError> {
        self.directory.graph_get_by_ids(caller, body)
    }

    /// Deletes a service principal; its tokens stop working on the next request.
    pub async fn delete_service_principal(
        &self,
        caller: &Principal,
        object_id: &str,
    ) -> Result<(), KvError> {
        self.directory
            .delete_service_principal(caller, object_id)
            .await
    }

    /// Graph's `GET /v1.0/applications[?$filter=…]` (kagi's service principals, each its own
    /// application).
    pub fn graph_applications(
        &self,
        caller: &Principal,
        filter: Option<&str>,
    ) -> Result<Value, KvError> {
        self.directory.graph_applications(caller, filter)
    }

    /// Graph's `GET /v1.0/applications/{id}`.
    pub fn graph_application(&self, caller: &Principal, id: &str) -> Result<Value, KvError> {
        self.directory.graph_application(caller, id)
    }

    /// Graph's `POST /v1.0/applications`: an application and its service principal, without
    /// a password.
    pub async fn create_application(
        &self,
        caller: &Principal,
        body: &Value,
    ) -> Result<Value, KvError> {
        self.directory.create_application(caller, body).await
    }

    /// Graph's `PATCH /v1.0/applications/{id}` (nothing kagi keeps changes).
    pub fn update_application(
        &self,
        caller: &Principal,
        id: &str,
        body: &Value,
    ) -> Result<(), KvError> {
        self.directory.update_application(caller, id, body)
    }

    /// Graph's `DELETE /v1.0/applications/{id}` (and its service principal).
    pub async fn delete_application(&self, caller: &Principal, id: &str) -> Result<(), KvError> {
        self.directory.delete_application(caller, id).await
    }

    /// Graph's `POST /v1.0/applications/{id}/addPassword`: a new password replacing the old
    /// one, shown once.
    pub async fn add_application_password(
        &self,
        caller: &Principal,
        id: &str,
        body: &Value,
    ) -> Result<Value, KvError> {
        self.directory
            .add_application_password(caller, id, body)
            .await
    }

    /// Graph's `POST /v1.0/applications/{id}/removePassword`.
    pub async fn remove_application_password(
        &self,
        caller: &Principal,
        id: &str,
        body: &Value,
    ) -> Result<(), KvError> {
        self.directory
            .remove_application_password(caller, id, body)
            .await
    }

    /// Graph's `POST /v1.0/servicePrincipals {"appId"}`: the service principal kagi made with
    /// the application.
    pub fn service_principal_of_application(
        &self,
        caller: &Principal,
        app_id: &str,
    ) -> Result<Value, KvError> {
        self.directory
            .service_principal_of_application(caller, app_id)
    }

    /// Issues a new client secret for a service principal (the old one stops working).
    pub async fn reset_service_principal_secret(
        &self,
        caller: &Principal,
        object_id: &str,
    ) -> Result<Value, KvError> {
        self.directory
            .reset_service_principal_secret(caller, object_id)
            .await
    }

    /// Answers `POST /{tenant}/oauth2/v2.0/token` with form fields already parsed, for a
    /// caller whose address is not known (the password grant then has no per-source throttle).
    pub async fn client_credentials(
        &self,
        tenant: &str,
        form: &HashMap<String, String>,
    ) -> Result<TokenGrant, TokenRequestError> {
        self.directory.client_credentials(tenant, form).await
    }

    /// Answers `POST /{tenant}/oauth2/v2.0/token` from the connection address `source`.
    pub async fn token_request(
        &self,
        tenant: &str,
        form: &HashMap<String, String>,
        source: Option<IpAddr>,
    ) -> Result<TokenGrant, TokenRequestError> {
        self.directory.token_request(tenant, form, source).await
    }

    /// How many password hashes the password grant has computed since start: one per attempt
    /// that reached the password check, whether the user exists or not.
    pub fn password_hashes_computed(&self) -> u64 {
        self.directory.password_hashes_computed()
    }

    /// The OpenID configuration document for a tenant.
    pub fn openid_configuration(&self, tenant: &str) -> Value {
        self.directory.openid_configuration(tenant)
    }

    /// The token signing keys: the one that signs, then those that still validate the tokens
    /// they signed (the bootstrap administrator only).
    pub fn signing_keys(&self, caller: &Principal) -> Result<Value, KvError> {
        self.directory.signing_keys(caller)
    }

    /// Rotates the token signing key (the bootstrap administrator only); see
    /// [`kagi_directory::Directory::rotate_signing_key`].
    pub async fn rotate_signing_key(
        &self,
        caller: &Principal,
        revoke_previous: bool,
    ) -> Result<Value, KvError> {
        self.directory
            .rotate_signing_key(caller, revoke_previous)
            .await
    }

    /// `GET` of one role assignment.
    pub fn get_role_assignment(&self, caller: &Principal, id: &str) -> Result<Value, KvError> {
        self.directory.get_role_assignment(caller, id)
    }
    /// `GET …/roleAssignments[?$filter=…]` (`atScope()`, `principalId eq`, `assignedTo()`).
    pub fn list_role_assignments_filtered(
        &self,
        caller: &Principal,
        scope: &str,
        filter: Option<&str>,
    ) -> Result<Value, KvError> {
        self.directory
            .list_role_assignments_filtered(caller, scope, filter)
    }

    /// `GET …/roleDefinitions[?$filter=…]` (`roleName eq`, `type eq`).
    pub fn list_role_definitions_filtered(
        &self,
        caller: &Principal,
        scope: &str,
        filter: Option<&str>,
    ) -> Result<Value, KvError> {
        self.directory
            .list_role_definitions_filtered(caller, scope, filter)
    }

    /// Lists role assignments at or below a scope (and above it: those that apply to it).
    pub fn list_role_assignments(&self, caller: &Principal, scope: &str) -> Result<Value, KvError> {
        self.directory.list_role_assignments(caller, scope)
    }

    /// `DELETE` of a role assignment: the next request of that principal is decided without it.
    pub async fn delete_role_assignment(
        &self,
        caller: &Principal,
        id: &str,
    ) -> Result<(u16, Value), KvError> {
        self.directory.delete_role_assignment(caller, id).await
    }

    /// `PUT {scope}/providers/Microsoft.Authorization/roleDefinitions/{guid}`: a custom role.
    pub async fn put_role_definition(
        &self,
        caller: &Principal,
        scope: &str,
        id: &str,
        input: Value,
    ) -> Result<(u16, Value), KvError> {
        self.directory
            .put_role_definition(caller, scope, id, input)
            .await
    }

    /// Lists role definitions (built-in and custom) visible at a scope.
    pub fn list_role_definitions(&self, caller: &Principal, scope: &str) -> Result<Value, KvError> {
        self.directory.list_role_definitions(caller, scope)
    }

    /// `GET` of one role definition.
    pub fn get_role_definition(
        &self,
        caller: &Principal,
        scope: &str,
        id: &str,
    ) -> Result<Value, KvError> {
        self.directory.get_role_definition(caller, scope, id)
    }

    /// `DELETE` of a custom role definition; refused while assigned.
    pub async fn delete_role_definition(
        &self,
        caller: &Principal,
        id: &str,
    ) -> Result<u16, KvError> {
        self.directory.delete_role_definition(caller, id).await
    }

    /// Lists locks at or above a scope.
    pub fn list_locks(&self, caller: &Principal, scope: &str) -> Result<Value, KvError> {
        self.directory.list_locks(caller, scope)
    }

    /// `GET` of a lock.
    pub fn get_lock(&self, caller: &Principal, scope: &str, name: &str) -> Result<Value, KvError> {
        self.directory.get_lock(caller, scope, name)
    }

    /// `DELETE` of a lock.
    pub async fn delete_lock(
        &self,
        caller: &Principal,
        scope: &str,
        name: &str,
    ) -> Result<u16, KvError> {
        self.directory.delete_lock(caller, scope, name).await
    }
}
