//! The stages `switchyard run` can start. Each is a [`crate::kafka::runtime::Processor`] plus its
//! wiring; adding a stage means a module here and one line in [`crate::app`].

pub mod agents;
pub mod resolve;
pub mod route;
