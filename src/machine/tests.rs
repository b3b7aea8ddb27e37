//! Transition tests for the restart state machine.
use super::*;
