//! The RFB 3.8 handshake for both roles (RFC 6143 sections 7.1 and 7.3): ProtocolVersion,
//! security negotiation, SecurityResult, ClientInit and ServerInit.
//!
//! Both machines have the same shape: `receive` consumes what it can from the bytes that have
//! arrived and returns how many it used (zero means "need more"); replies accumulate in an
//! output buffer that the caller drains with `take_output`. After an error the output may
//! still hold bytes that tell the peer why (a SecurityResult with a reason); send them before
//! closing, as RFC 6143 7.1.3 asks.

#[cfg(feature = "vnc-auth")]
use crate::auth;
use crate::{
    PixelFormat, RfbError, SECURITY_NONE, SECURITY_VNC_AUTH, VERSION_3_8, be16, length_prefixed,
    parse_version,
};

/// VNC Authentication's check and response, through [`auth`]; built without DES (feature
/// `vnc-auth` off), both are a named failure.
#[cfg(feature = "vnc-auth")]
fn vnc_auth_verify(
    password: &[u8],
    challenge: &[u8; 16],
    answer: &[u8; 16],
) -> Result<bool, RfbError> {
    Ok(auth::verify(password, challenge, answer))
}

#[cfg(feature = "vnc-auth")]
fn vnc_auth_response(password: &[u8], challenge: &[u8; 16]) -> Result<[u8; 16], RfbError> {
    Ok(auth::response(password, challenge))
}

#[cfg(not(feature = "vnc-auth"))]
fn no_des() -> RfbError {
    RfbError::AuthFailed("built without VNC Authentication (vncgate-rfb feature vnc-auth)".into())
}

#[cfg(not(feature = "vnc-auth"))]
fn vnc_auth_verify(_: &[u8], _: &[u8; 16], _: &[u8; 16]) -> Result<bool, RfbError> {
    Err(no_des())
}

#[cfg(not(feature = "vnc-auth"))]
fn vnc_auth_response(_: &[u8], _: &[u8; 16]) -> Result<[u8; 16], RfbError> {
    Err(no_des())
}

/// ServerInit (RFC 6143 section 7.3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInit {
    pub width: u16,
    pub height: u16,
    pub pixel_format: PixelFormat,
    pub name: String,
}

impl ServerInit {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.width.to_be_bytes());
        out.extend_from_slice(&self.height.to_be_bytes());
        out.extend_from_slice(&self.pixel_format.to_bytes());
        out.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
    }

    /// Decodes a ServerInit at the start of `b`: the message and its length, or `None`.
    pub fn decode(b: &[u8]) -> Result<Option<(ServerInit, usize)>, RfbError> {
        if b.len() < 20 {
            return Ok(None);
        }
        let Some((name, used)) = length_prefixed(b, 20, "desktop name")? else {
            return Ok(None);
        };
        let pf: &[u8; 16] = b[4..20].try_into().expect("16 bytes");
        Ok(Some((
            ServerInit {
                width: be16(b, 0),
                height: be16(b, 2),
                pixel_format: PixelFormat::from_bytes(pf),
                name: String::from_utf8_lossy(name).into_owned(),
            },
            used,
        )))
    }
}

/// Appends a failed SecurityResult with its reason (RFC 6143 7.1.3, 3.8 form).
fn push_security_failure(out: &mut Vec<u8>, reason: &str) {
    out.extend_from_slice(&1u32.to_be_bytes());
    out.extend_from_slice(&(reason.len() as u32).to_be_bytes());
    out.extend_from_slice(reason.as_bytes());
}

/// What security the server side offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerSecurity {
    /// Security type 1: no authentication.
    None,
    /// Security type 2 with this password and this challenge. The challenge is an argument
    /// (not drawn here) so this module stays free of randomness; callers draw 16 random bytes.
    VncAuth {
        password: Vec<u8>,
        challenge: [u8; 16],
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerState {
    Version,
    SecurityChoice,
    AuthResponse,
    ClientInit,
    Done,
    Failed,
}

/// The server role: sends its version first, then answers the client step by step.
#[derive(Debug)]
pub struct ServerHandshake {
    state: ServerState,
    security: ServerSecurity,
    init: ServerInit,
    shared: Option<bool>,
    out: Vec<u8>,
}

impl ServerHandshake {
    /// Starts a handshake; the output already holds the server's ProtocolVersion.
    pub fn new(security: ServerSecurity, init: ServerInit) -> ServerHandshake {
        ServerHandshake {
            state: ServerState::Version,
            security,
            init,
            shared: None,
            out: VERSION_3_8.to_vec(),
        }
    }

    /// Consumes client bytes; returns how many were used. Stops at the end of the handshake,
    /// so bytes after ClientInit (the client's first messages) are left to the caller.
    pub fn receive(&mut self, input: &[u8]) -> Result<usize, RfbError> {
        let mut used = 0;
        loop {
            let b = &input[used..];
            let step = match self.state {
                ServerState::Version => {
                    let Some(v) = b.first_chunk::<12>() else {
                        break;
                    };
                    self.fail_unless(parse_version(v).and_then(|ver| match ver {
                        (3, 8) => Ok(()),
                        (major, minor) => Err(RfbError::UnsupportedVersion { major, minor }),
                    }))?;
                    match self.security {
                        ServerSecurity::None => self.out.extend_from_slice(&[1, SECURITY_NONE]),
                        ServerSecurity::VncAuth { .. } => {
                            self.out.extend_from_slice(&[1, SECURITY_VNC_AUTH])
                        }
                    }
                    self.state = ServerState::SecurityChoice;
                    12
                }
                ServerState::SecurityChoice => {
                    let Some(&choice) = b.first() else { break };
                    match (&self.security, choice) {
                        (ServerSecurity::None, SECURITY_NONE) => {
                            self.out.extend_from_slice(&0u32.to_be_bytes());
                            self.state = ServerState::ClientInit;
                        }
                        (ServerSecurity::VncAuth { challenge, .. }, SECURITY_VNC_AUTH) => {
                            self.out.extend_from_slice(challenge);
                            self.state = ServerState::AuthResponse;
                        }
                        _ => {
                            push_security_failure(&mut self.out, "security type not offered");
                            self.state = ServerState::Failed;
                            return Err(RfbError::BadSecurityChoice(choice));
                        }
                    }
                    1
                }
                ServerState::AuthResponse => {
                    let Some(answer) = b.first_chunk::<16>() else {
                        break;
                    };
                    let ServerSecurity::VncAuth {
                        password,
                        challenge,
                    } = &self.security
                    else {
                        unreachable!("AuthResponse is only entered with VncAuth");
                    };
                    let ok = vnc_auth_verify(password, challenge, answer).inspect_err(|_| {
                        self.state = ServerState::Failed;
                    })?;
                    if !ok {
                        push_security_failure(&mut self.out, "authentication failed");
                        self.state = ServerState::Failed;
                        return Err(RfbError::AuthFailed("wrong password".into()));
                    }
                    self.out.extend_from_slice(&0u32.to_be_bytes());
                    self.state = ServerState::ClientInit;
                    16
                }
                ServerState::ClientInit => {
                    let Some(&shared) = b.first() else { break };
                    self.shared = Some(shared != 0);
                    self.init.encode(&mut self.out);
                    self.state = ServerState::Done;
                    1
                }
                ServerState::Done | ServerState::Failed => break,
            };
            used += step;
        }
        Ok(used)
    }

    fn fail_unless(&mut self, r: Result<(), RfbError>) -> Result<(), RfbError> {
        if r.is_err() {
            self.state = ServerState::Failed;
        }
        r
    }

    /// Whether ServerInit has been queued: from here on the stream carries normal messages.
    pub fn is_done(&self) -> bool {
        self.state == ServerState::Done
    }

    /// The client's shared-flag from ClientInit, once received.
    pub fn shared(&self) -> Option<bool> {
        self.shared
    }

    /// Bytes to send to the client, in order.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientState {
    Version,
    SecurityTypes,
    Challenge,
    SecurityResult,
    ServerInit,
    Done,
    Failed,
}

/// The client role. Picks VNC Authentication when it has a password and the server offers
/// it, else None.
#[derive(Debug)]
pub struct ClientHandshake {
    state: ClientState,
    password: Option<Vec<u8>>,
    shared: bool,
    security: Option<u8>,
    server_init: Option<ServerInit>,
    out: Vec<u8>,
}

impl ClientHandshake {
    pub fn new(password: Option<&[u8]>, shared: bool) -> ClientHandshake {
        ClientHandshake {
            state: ClientState::Version,
            password: password.map(<[u8]>::to_vec),
            shared,
            security: None,
            server_init: None,
            out: Vec::new(),
        }
    }

    /// Consumes server bytes; returns how many were used. Stops after ServerInit.
    pub fn receive(&mut self, input: &[u8]) -> Result<usize, RfbError> {
        let mut used = 0;
        while !matches!(self.state, ClientState::Done | ClientState::Failed) {
            match self.step(&input[used..]) {
                Ok(Some(n)) => used += n,
                Ok(None) => break,
                Err(e) => {
                    self.state = ClientState::Failed;
                    return Err(e);
                }
            }
        }
        Ok(used)
    }

    fn step(&mut self, b: &[u8]) -> Result<Option<usize>, RfbError> {
        Ok(Some(match self.state {
            ClientState::Version => {
                let Some(v) = b.first_chunk::<12>() else {
                    return Ok(None);
                };
                let (major, minor) = parse_version(v)?;
                // A client replies with the highest version it supports that is not above the
                // server's (RFC 6143 7.1.1); below 3.8 the security messages differ.
                if (major, minor) < (3, 8) {
                    return Err(RfbError::UnsupportedVersion { major, minor });
                }
                self.out.extend_from_slice(VERSION_3_8);
                self.state = ClientState::SecurityTypes;
                12
            }
            ClientState::SecurityTypes => {
                let Some(&n) = b.first() else { return Ok(None) };
                let n = usize::from(n);
                if n == 0 {
                    let Some((reason, _)) = length_prefixed(b, 1, "failure reason")? else {
                        return Ok(None);
                    };
                    return Err(RfbError::ConnectionFailed(
                        String::from_utf8_lossy(reason).into_owned(),
                    ));
                }
                let Some(types) = b.get(1..1 + n) else {
                    return Ok(None);
                };
                let choice = if self.password.is_some() && types.contains(&SECURITY_VNC_AUTH) {
                    SECURITY_VNC_AUTH
                } else if types.contains(&SECURITY_NONE) {
                    SECURITY_NONE
                } else if types.contains(&SECURITY_VNC_AUTH) {
                    return Err(RfbError::PasswordRequired);
                } else {
                    return Err(RfbError::NoSupportedSecurity(types.to_vec()));
                };
                self.out.push(choice);
                self.security = Some(choice);
                self.state = if choice == SECURITY_VNC_AUTH {
                    ClientState::Challenge
                } else {
                    ClientState::SecurityResult
                };
                1 + n
            }
            ClientState::Challenge => {
                let Some(challenge) = b.first_chunk::<16>() else {
                    return Ok(None);
                };
                let password = self.password.as_deref().unwrap_or_default();
                let answer = vnc_auth_response(password, challenge).inspect_err(|_| {
                    self.state = ClientState::Failed;
                })?;
                self.out.extend_from_slice(&answer);
                self.state = ClientState::SecurityResult;
                16
            }
            ClientState::SecurityResult => {
                let Some(result) = b.first_chunk::<4>() else {
                    return Ok(None);
                };
                if u32::from_be_bytes(*result) != 0 {
                    let Some((reason, _)) = length_prefixed(b, 4, "failure reason")? else {
                        return Ok(None);
                    };
                    return Err(RfbError::AuthFailed(
                        String::from_utf8_lossy(reason).into_owned(),
                    ));
                }
                self.out.push(u8::from(self.shared));
                self.state = ClientState::ServerInit;
                4
            }
            ClientState::ServerInit => {
                let Some((init, used)) = ServerInit::decode(b)? else {
                    return Ok(None);
                };
                self.server_init = Some(init);
                self.state = ClientState::Done;
                used
            }
            ClientState::Done | ClientState::Failed => return Ok(None),
        }))
    }

    /// The server's ServerInit, once the handshake is complete.
    pub fn server_init(&self) -> Option<&ServerInit> {
        self.server_init.as_ref()
    }

    /// The security type agreed on, once chosen.
    pub fn security(&self) -> Option<u8> {
        self.security
    }

    pub fn is_done(&self) -> bool {
        self.state == ClientState::Done
    }

    /// Bytes to send to the server, in order.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init() -> ServerInit {
        ServerInit {
            width: 1024,
            height: 768,
            pixel_format: PixelFormat::BGRX_LE,
            name: "vm".into(),
        }
    }

    const INIT_BYTES: [u8; 26] = [
        0x04, 0x00, 0x03, 0x00, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0, 0, 0, 0,
        2, b'v', b'm',
    ];

    #[test]
    fn server_init_bytes() {
        let mut out = Vec::new();
        init().encode(&mut out);
        assert_eq!(out, INIT_BYTES);
        assert_eq!(ServerInit::decode(&out), Ok(Some((init(), 26))));
        for cut in 0..out.len() {
            assert_eq!(ServerInit::decode(&out[..cut]), Ok(None), "cut at {cut}");
        }
    }

    /// Feeds `input` to `feed` one byte at a time, as a worst-case socket would deliver it.
    #[cfg(feature = "vnc-auth")]
    fn trickle(input: &[u8], mut feed: impl FnMut(&[u8]) -> Result<usize, RfbError>) {
        let mut pending = Vec::new();
        for &byte in input {
            pending.push(byte);
            let n = feed(&pending).unwrap();
            pending.drain(..n);
        }
        assert!(pending.is_empty(), "unconsumed: {pending:?}");
    }

    #[test]
    fn server_none_byte_for_byte() {
        let mut hs = ServerHandshake::new(ServerSecurity::None, init());
        assert_eq!(hs.take_output(), b"RFB 003.008\n");
        assert_eq!(hs.receive(b"RFB 003.008\n").unwrap(), 12);
        assert_eq!(hs.take_output(), [1, 1]);
        assert_eq!(hs.receive(&[1]).unwrap(), 1);
        assert_eq!(hs.take_output(), [0, 0, 0, 0]);
        // ClientInit plus the first byte of a following message: only ClientInit is taken.
        assert_eq!(hs.receive(&[1, 3]).unwrap(), 1);
        assert_eq!(hs.take_output(), INIT_BYTES);
        assert!(hs.is_done());
        assert_eq!(hs.shared(), Some(true));
    }

    #[test]
    fn server_rejects_old_version_and_unoffered_type() {
        let mut hs = ServerHandshake::new(ServerSecurity::None, init());
        assert_eq!(
            hs.receive(b"RFB 003.003\n"),
            Err(RfbError::UnsupportedVersion { major: 3, minor: 3 })
        );
        let mut hs = ServerHandshake::new(ServerSecurity::None, init());
        hs.take_output();
        hs.receive(b"RFB 003.008\n").unwrap();
        hs.take_output();
        assert_eq!(hs.receive(&[2]), Err(RfbError::BadSecurityChoice(2)));
        let mut expect = vec![0, 0, 0, 1, 0, 0, 0, 25];
        expect.extend_from_slice(b"security type not offered");
        assert_eq!(hs.take_output(), expect);
    }

    #[cfg(feature = "vnc-auth")]
    fn vnc(password: &[u8]) -> ServerSecurity {
        ServerSecurity::VncAuth {
            password: password.to_vec(),
            challenge: core::array::from_fn(|i| i as u8),
        }
    }

    #[test]
    #[cfg(feature = "vnc-auth")] // computes VNC Authentication's DES responses
    fn both_roles_agree_split_at_every_byte() {
        for (server_sec, client_pw) in [
            (ServerSecurity::None, None),
            (ServerSecurity::None, Some(&b"unused"[..])),
            (vnc(b"secret"), Some(&b"secret"[..])),
        ] {
            let mut server = ServerHandshake::new(server_sec, init());
            let mut client = ClientHandshake::new(client_pw, true);
            // Ping-pong until both are done, delivering every flight one byte at a time.
            for _ in 0..8 {
                let to_client = server.take_output();
                trickle(&to_client, |b| client.receive(b));
                let to_server = client.take_output();
                trickle(&to_server, |b| server.receive(b));
            }
            let to_client = server.take_output();
            trickle(&to_client, |b| client.receive(b));
            assert!(server.is_done() && client.is_done());
            assert_eq!(client.server_init(), Some(&init()));
        }
    }

    #[test]
    #[cfg(feature = "vnc-auth")] // computes VNC Authentication's DES responses
    fn client_vnc_auth_byte_for_byte() {
        let mut c = ClientHandshake::new(Some(b"password"), false);
        assert_eq!(c.receive(b"RFB 003.008\n").unwrap(), 12);
        assert_eq!(c.take_output(), b"RFB 003.008\n");
        assert_eq!(c.receive(&[2, 1, 2]).unwrap(), 3);
        assert_eq!(c.take_output(), [2]);
        let challenge: Vec<u8> = (0..16).collect();
        assert_eq!(c.receive(&challenge).unwrap(), 16);
        assert_eq!(
            c.take_output(),
            [
                0xb8, 0x66, 0x92, 0x41, 0x25, 0xc8, 0xee, 0xbb, 0x9d, 0xeb, 0xc1, 0xdb, 0x61, 0xc5,
                0x38, 0xe2
            ]
        );
        assert_eq!(c.receive(&[0, 0, 0, 0]).unwrap(), 4);
        assert_eq!(c.take_output(), [0]);
        assert_eq!(c.receive(&INIT_BYTES).unwrap(), 26);
        assert!(c.is_done());
    }

    #[test]
    #[cfg(feature = "vnc-auth")] // computes VNC Authentication's DES responses
    fn client_sees_failures() {
        let mut c = ClientHandshake::new(Some(b"wrong"), true);
        c.receive(b"RFB 003.008\n").unwrap();
        c.receive(&[1, 2]).unwrap();
        c.receive(&[9; 16]).unwrap();
        let fail = [0, 0, 0, 1, 0, 0, 0, 4, b'n', b'o', b'p', b'e'];
        for cut in 0..fail.len() {
            assert_eq!(c.receive(&fail[..cut]), Ok(0));
        }
        assert_eq!(c.receive(&fail), Err(RfbError::AuthFailed("nope".into())));

        let mut c = ClientHandshake::new(None, true);
        c.receive(b"RFB 003.008\n").unwrap();
        assert_eq!(c.receive(&[1, 2]), Err(RfbError::PasswordRequired));

        let mut c = ClientHandshake::new(None, true);
        c.receive(b"RFB 003.008\n").unwrap();
        assert_eq!(
            c.receive(&[0, 0, 0, 0, 4, b'b', b'u', b's', b'y']),
            Err(RfbError::ConnectionFailed("busy".into()))
        );

        let mut c = ClientHandshake::new(None, true);
        assert!(matches!(
            c.receive(b"SSH-2.0-Open"),
            Err(RfbError::BadVersion(_))
        ));
        let mut c = ClientHandshake::new(None, true);
        assert!(matches!(
            c.receive(b"RFB 003.003\n"),
            Err(RfbError::UnsupportedVersion { .. })
        ));
    }
}
