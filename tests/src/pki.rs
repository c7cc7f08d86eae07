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
