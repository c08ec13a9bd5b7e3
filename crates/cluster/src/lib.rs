//! Multi-node petrel: nodes share a NATS cluster as their routing fabric (issue 11). This crate
//! starts with the mapping every other part rests on: MQTT topic names and filters as NATS
//! subjects ([`subject`]).

pub mod subject;
