//! ctmirror: a table-level change-tracking mirror.
//!
//! A tenant database (the *source*) is mirrored, table by table and limited to
//! the columns an application's schema map allows, into a partner's PostgreSQL
//! through a signed HTTP protocol. The agent drives cycles; the receiver owns
//! the cursor and writes it in the same transaction as the data.

pub mod agent;
pub mod auth;
pub mod config;
pub mod control;
pub mod ids;
pub mod ops;
pub mod pgtext;
pub mod protocol;
pub mod receiver;
pub mod schedule;
pub mod schema_map;
pub mod source;
pub mod tls;
pub mod verify;
