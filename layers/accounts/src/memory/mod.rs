//! In-memory stores: real implementations (the demo gateway and the tests run on them), for
//! one process.

mod sessions;
mod usage;
mod users;

pub use sessions::MemoryDashboardSessionStore;
pub use usage::MemoryUsageStore;
pub use users::MemoryUserStore;

fn ready<T: Send + 'static>(value: T) -> tollgate_core::BoxFuture<T> {
    Box::pin(std::future::ready(value))
}
