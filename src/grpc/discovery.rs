//! What a client can discover on a listener: gRPC reflection in both versions clients
//! speak (v1, and v1alpha for the Python reflection client, older grpcurl, Postman,
//! Evans), each advertising exactly the services this listener serves, and the standard
//! health service with a status per service.

use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::{HealthReporter, HealthService};
use tonic_reflection::server::{v1, v1alpha};

use super::{ServeError, pb};

const HEALTH: &str = "grpc.health.v1.Health";
const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";

/// Reflection v1 and v1alpha for a listener serving `services` (plus health and both
/// reflections themselves).
pub fn reflection(
    services: &[&str],
) -> Result<
    (
        v1::ServerReflectionServer<impl v1::ServerReflection>,
        v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>,
    ),
    ServeError,
> {
    let builder = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
            .include_reflection_service(false);
        for name in services.iter().copied().chain([HEALTH, REFLECTION_V1, REFLECTION_V1ALPHA]) {
            b = b.with_service_name(name);
        }
        b
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

/// The health service reporting what `reporter` is told.
pub fn health(reporter: HealthReporter) -> HealthServer<impl Health> {
    HealthServer::new(HealthService::from_health_reporter(reporter))
}

/// Every method path this server knows, from the descriptor sets it advertises: metrics
/// label calls by method only when it is one of these, so a client inventing paths cannot
/// grow the label set.
pub fn is_known_method(path: &str) -> bool {
    static KNOWN: std::sync::OnceLock<std::collections::HashSet<String>> = std::sync::OnceLock::new();
    KNOWN
        .get_or_init(|| {
            use prost::Message;
            let sets = [
                pb::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            ];
            let mut known = std::collections::HashSet::new();
            for set in sets {
                let Ok(set) = prost_types::FileDescriptorSet::decode(set) else { continue };
                for file in set.file {
                    for service in &file.service {
                        for method in &service.method {
                            known.insert(format!("/{}.{}/{}", file.package(), service.name(), method.name()));
                        }
                    }
                }
            }
            known
        })
        .contains(path)
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_methods_come_from_the_descriptors_and_nothing_else_does() {
        assert!(super::is_known_method("/chatvault.v1.TranscriptService/GetTranscript"));
        assert!(super::is_known_method("/chatvault.v1.AdminService/ListTenants"));
        assert!(super::is_known_method("/grpc.health.v1.Health/Check"));
        assert!(super::is_known_method("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"));
        assert!(!super::is_known_method("/chatvault.v1.TranscriptService/Invented"));
    }
}
