mod api;
mod at_rest;
mod cli;
mod common;
mod durability;
mod shredding;
mod tenancy;
mod tls;
