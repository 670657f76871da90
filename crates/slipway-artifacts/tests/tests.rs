//! The one integration-test binary of slipway-artifacts (`autotests = false`).

mod util;

mod extract_hostile;
mod guards;
mod hash;
mod ignore_rules;
mod round_trip;
mod stat_cache;
mod store;
mod upload;
