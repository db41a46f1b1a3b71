//! Who may do what to a chat session: the one place the rule lives.
//!
//! | caller                                   | read (get, messages) | modify (delete, append) |
//! |------------------------------------------|----------------------|-------------------------|
//! | the owner                                | yes                  | yes                     |
//! | admin                                    | yes                  | no                      |
//! | supervisor sharing a cohort with owner   | yes                  | no                      |
//! | anyone else                              | no                   | no                      |
//!
//! A denied caller is told the session does not exist (404, never 403), so
//! session ids of other users cannot be probed.

use super::{Principal, Role};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Modify,
}

/// The owner of a session, as the store keeps it.
#[derive(Debug, Clone, Copy)]
pub struct Owner<'a> {
    pub user_id: &'a str,
    /// The owner's cohorts when the session was created.
    pub cohorts: &'a [String],
}

pub fn may_access(caller: &Principal, owner: Owner<'_>, access: Access) -> bool {
    if caller.sub == owner.user_id {
        return true;
    }
    match (caller.role, access) {
        (Role::Admin, Access::Read) => true,
        (Role::Supervisor, Access::Read) => caller
            .cohorts
            .iter()
            .any(|cohort| owner.cohorts.contains(cohort)),
        (Role::User, _) | (Role::Admin | Role::Supervisor, Access::Modify) => false,
    }
}

/// Who may observe a session's replies live: admins, and supervisors sharing
/// a cohort with its owner. Owners follow their own replies through the
/// stream endpoints; everyone else is told the session does not exist.
pub fn may_observe(caller: &Principal, owner: Owner<'_>) -> bool {
    match caller.role {
        Role::Admin => true,
        Role::Supervisor => caller
            .cohorts
            .iter()
            .any(|cohort| owner.cohorts.contains(cohort)),
        Role::User => false,
    }
}
