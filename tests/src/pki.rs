//! Throwaway certificate authorities for TLS tests, made at run time.

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A CA and a leaf for 127.0.0.1 signed by it: (CA PEM, leaf DER, leaf key DER).
pub fn throwaway_pki() -> (String, CertificateDer<'static>, PrivateKeyDer<'static>) {
    let (ca, leaf, key) = throwaway_pki_pem();
    let leaf_der = rustls_pemfile::certs(&mut leaf.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let key_der = rustls_pemfile::private_key(&mut key.as_bytes())
        .unwrap()
        .unwrap();
    (ca, leaf_der, key_der)
}

/// A CA and a leaf for 127.0.0.1 signed by it, all PEM: (CA, leaf, leaf key).
pub fn throwaway_pki_pem() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "relay test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf_params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
    (ca.pem(), leaf.pem(), leaf_key.serialize_pem())
}

/// A CA for client certificates: (its certificate, its key).
pub fn client_ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    (params.self_signed(&key).unwrap(), key)
}

/// A client certificate signed by `ca` with these DNS and URI subject alternative names:
/// (certificate PEM, key PEM).
pub fn client_cert(
    ca: &(rcgen::Certificate, rcgen::KeyPair),
    dns: &[&str],
    uris: &[&str],
) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    for d in dns {
        params
            .subject_alt_names
            .push(rcgen::SanType::DnsName((*d).try_into().unwrap()));
    }
    for u in uris {
        params
            .subject_alt_names
            .push(rcgen::SanType::URI((*u).try_into().unwrap()));
    }
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &ca.0, &ca.1).unwrap();
    (cert.pem(), key.serialize_pem())
}
