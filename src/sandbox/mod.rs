//! The sandbox upstream (being written).
