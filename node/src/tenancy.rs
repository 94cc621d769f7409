//! Tenants, API keys and roles, and each tenant's catalog of definitions.
//!
//! Keys are `bzk_<key id>_<secret>`: 48 random bits that name the key and
//! 256 random bits of secret. Only SHA-256 of the whole key is stored; a
//! presented key is looked up by its id and its hash compared in constant
//! time, so neither storage nor timing gives a key away. The bootstrap admin
//! key from `BAZAAR_ADMIN_KEY` is held the same way, in memory only.
//!
//! Definitions are stored in the `defs` tree and held in memory as one
//! immutable [`Catalog`] per tenant, replaced whole on every change (an
//! event is judged against one consistent set of rules). Changes to one
//! tenant's definitions are serialised by its own lock.

use crate::error::{Code, ServiceError, ServiceResult};
use crate::storage::{decode, encode, key, StorageError, Store};
use bazaar_games::catalog::Catalog;
use bazaar_games::Id;
use parking_lot::RwLock;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use subtle::ConstantTimeEq;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything, in every tenant.
    Admin,
    /// Configure and read one tenant.
    Operator,
    /// Send events, spin, read customers of one tenant.
    Pos,
    /// Read jackpots and leaderboards of one tenant.
    Display,
}

impl Role {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "admin" => Some(Self::Admin),
            "operator" => Some(Self::Operator),
            "pos" => Some(Self::Pos),
            "display" => Some(Self::Display),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Operator => "operator",
            Self::Pos => "pos",
            Self::Display => "display",
        }
    }
}

/// Who is calling: the role and tenant of the key presented.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub role: Role,
    /// `None` for admin keys, which span tenants.
    pub tenant: Option<Id>,
    pub key_id: String,
}

impl Principal {
    /// Allows the call if the principal is an admin, or has one of `roles`
    /// in `tenant`.
    pub fn require(&self, tenant: &Id, roles: &[Role]) -> ServiceResult<()> {
        if self.role == Role::Admin {
            return Ok(());
        }
        if self.tenant.as_ref() != Some(tenant) {
            return Err(ServiceError::new(
                Code::PermissionDenied,
                format!("this key may not access tenant {tenant:?}"),
            ));
        }
        if !roles.contains(&self.role) {
            let allowed: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
            return Err(ServiceError::new(
                Code::PermissionDenied,
                format!("a {} key may not do this; it needs one of: admin, {}", self.role.as_str(), allowed.join(", ")),
            ));
        }
        Ok(())
    }

    pub fn require_admin(&self) -> ServiceResult<()> {
        if self.role == Role::Admin {
            Ok(())
        } else {
            Err(ServiceError::new(Code::PermissionDenied, "only an admin key may do this"))
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Tenant {
    pub id: Id,
    pub name: String,
    /// ISO 4217 code, e.g. EUR.
    pub currency: String,
    pub created_at: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct KeyRecord {
    key_id: String,
    hash: [u8; 32],
    role: Role,
    tenant: Option<Id>,
    created_at: i64,
}

/// A definition as stored, with its version.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoredDef<T> {
    pub version: u64,
    pub updated_at: i64,
    pub def: T,
}

/// The kinds of definition, as named in storage keys and URLs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefKind {
    Store,
    Campaign,
    Wheel,
    Jackpot,
    Mission,
    Leaderboard,
}

impl DefKind {
    pub const ALL: [DefKind; 6] =
        [Self::Store, Self::Campaign, Self::Wheel, Self::Jackpot, Self::Mission, Self::Leaderboard];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Store => "store",
            Self::Campaign => "campaign",
            Self::Wheel => "wheel",
            Self::Jackpot => "jackpot",
            Self::Mission => "mission",
            Self::Leaderboard => "leaderboard",
        }
    }
}

/// One tenant in memory.
pub struct TenantEntry {
    pub tenant: Tenant,
    catalog: RwLock<Arc<Catalog>>,
    versions: RwLock<HashMap<(&'static str, Id), u64>>,
    /// Serialises definition changes of this tenant.
    pub write_lock: tokio::sync::Mutex<()>,
    /// Its unary events waiting for their batch.
    pub unary: crate::coalesce::Lane<crate::service::QueuedEvent>,
}

impl TenantEntry {
    fn new(tenant: Tenant) -> Self {
        Self {
            tenant,
            catalog: RwLock::new(Arc::new(Catalog::default())),
            versions: RwLock::new(HashMap::new()),
            write_lock: tokio::sync::Mutex::new(()),
            unary: Default::default(),
        }
    }

    /// The tenant's current definitions.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.read().clone()
    }

    pub fn version(&self, kind: DefKind, id: &Id) -> u64 {
        self.versions.read().get(&(kind.as_str(), id.clone())).copied().unwrap_or(0)
    }
}

/// Tenants, keys and catalogs of a node.
pub struct Tenancy {
    store: Store,
    tenants: RwLock<HashMap<Id, Arc<TenantEntry>>>,
    keys: RwLock<HashMap<String, KeyRecord>>,
    /// SHA-256 of the bootstrap admin key given by flag or environment.
    bootstrap_admin: Option<[u8; 32]>,
    /// Keys verified since start-up, by [`Tenancy::tag`] of the key as
    /// presented: a till presents its key with every request, and hashing
    /// it with SHA-256 each time was 3,600 instructions of about 100,000
    /// per unary event. The raw key is not kept.
    verified: RwLock<crate::FastMap<u128, Principal>>,
    /// The secret, random keys of the tags' SipHash (std's `RandomState`).
    tagger: std::collections::hash_map::RandomState,
}

/// Verified keys remembered at most; past this the memory starts again
/// (a node serves a few hundred tills' keys, not thousands).
const VERIFIED_KEYS: usize = 4_096;

/// The `meta` key recording that a bootstrap admin key was generated.
const GENERATED_ADMIN: &[u8] = b"generated_admin_key";

impl Tenancy {
    /// Loads every tenant, key and definition from storage.
    pub fn load(store: Store, bootstrap_admin: Option<&str>) -> Result<Self, StorageError> {
        let tenancy = Self {
            store: store.clone(),
            tenants: RwLock::new(HashMap::new()),
            keys: RwLock::new(HashMap::new()),
            bootstrap_admin: bootstrap_admin.map(|k| Sha256::digest(k.as_bytes()).into()),
            verified: RwLock::new(crate::FastMap::default()),
            tagger: std::collections::hash_map::RandomState::new(),
        };
        for item in store.defs.scan_prefix(b"key/") {
            let (_, value) = item?;
            let record: KeyRecord = decode(&value)?;
            tenancy.keys.write().insert(record.key_id.clone(), record);
        }
        for item in store.defs.scan_prefix(b"tenant/") {
            let (_, value) = item?;
            let tenant: Tenant = decode(&value)?;
            let entry = Arc::new(TenantEntry::new(tenant.clone()));
            tenancy.load_catalog(&entry)?;
            tenancy.tenants.write().insert(tenant.id.clone(), entry);
        }
        Ok(tenancy)
    }

    fn load_catalog(&self, entry: &TenantEntry) -> Result<(), StorageError> {
        let mut catalog = Catalog::default();
        let mut versions = HashMap::new();
        let tenant = entry.tenant.id.as_str();
        for kind in DefKind::ALL {
            for item in self.store.defs.scan_prefix(key(&["def", tenant, kind.as_str(), ""])) {
                let (storage_key, value) = item?;
                let id_text = std::str::from_utf8(&storage_key)
                    .ok()
                    .and_then(|k| k.rsplit('/').next())
                    .ok_or_else(|| StorageError::Codec("definition key is not UTF-8".into()))?;
                let id = Id::parse(id_text).map_err(|e| StorageError::Codec(e.to_string()))?;
                let version = match kind {
                    DefKind::Store => insert(&mut catalog.stores, id.clone(), &value)?,
                    DefKind::Campaign => insert(&mut catalog.campaigns, id.clone(), &value)?,
                    DefKind::Wheel => insert(&mut catalog.wheels, id.clone(), &value)?,
                    DefKind::Jackpot => insert(&mut catalog.jackpots, id.clone(), &value)?,
                    DefKind::Mission => insert(&mut catalog.missions, id.clone(), &value)?,
                    DefKind::Leaderboard => insert(&mut catalog.leaderboards, id.clone(), &value)?,
                };
                versions.insert((kind.as_str(), id), version);
            }
        }
        *entry.catalog.write() = Arc::new(catalog);
        *entry.versions.write() = versions;
        Ok(())
    }

    /// Whether a first admin key must be generated (none given, none made).
    pub fn needs_generated_admin(&self) -> Result<bool, StorageError> {
        Ok(self.bootstrap_admin.is_none() && self.store.meta.get(GENERATED_ADMIN)?.is_none())
    }

    /// Makes and stores the first admin key; returns it (shown once).
    pub async fn generate_admin(&self) -> ServiceResult<String> {
        let key = self.create_key(Role::Admin, None).await?;
        self.store.meta.insert(GENERATED_ADMIN, &[1]).map_err(StorageError::from)?;
        self.store.flush_async().await?;
        Ok(key)
    }

    /// Identifies the caller from a bearer key.
    pub fn authenticate(&self, presented: Option<&str>) -> ServiceResult<Principal> {
        let unauthenticated = |message: &str| ServiceError::new(Code::Unauthenticated, message);
        let presented =
            presented.ok_or_else(|| unauthenticated("missing API key: send `Authorization: Bearer <key>`"))?;
        let tag = self.tag(presented);
        if let Some(principal) = self.verified.read().get(&tag) {
            return Ok(principal.clone());
        }
        let principal = self.verify(presented).map_err(unauthenticated)?;
        let mut verified = self.verified.write();
        if VERIFIED_KEYS <= verified.len() {
            verified.clear();
        }
        verified.insert(tag, principal.clone());
        Ok(principal)
    }

    /// A 128-bit tag of a presented key: two SipHashes under the node's
    /// secret random keys, told apart by a leading byte. Finding another
    /// string with a remembered key's tag takes the secret keys, or about
    /// 2^128 tries; no key can be revoked yet, and revoking one would have
    /// to forget the tags too.
    fn tag(&self, presented: &str) -> u128 {
        use std::hash::BuildHasher;
        let high = self.tagger.hash_one((0u8, presented));
        let low = self.tagger.hash_one((1u8, presented));
        (u128::from(high) << 64) | u128::from(low)
    }

    /// Checks a presented key against the stored hashes.
    fn verify(&self, presented: &str) -> Result<Principal, &'static str> {
        let hash: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        if let Some(key_id) = presented.strip_prefix("bzk_").and_then(|rest| rest.split('_').next()) {
            if let Some(record) = self.keys.read().get(key_id) {
                if bool::from(record.hash.ct_eq(&hash)) {
                    return Ok(Principal {
                        role: record.role,
                        tenant: record.tenant.clone(),
                        key_id: key_id.to_owned(),
                    });
                }
            }
        }
        if let Some(admin) = &self.bootstrap_admin {
            if bool::from(admin.ct_eq(&hash)) {
                return Ok(Principal { role: Role::Admin, tenant: None, key_id: "bootstrap".into() });
            }
        }
        Err("unknown API key")
    }

    /// Creates a key; returns the key itself, which is never stored.
    pub async fn create_key(&self, role: Role, tenant: Option<Id>) -> ServiceResult<String> {
        let mut id_bytes = [0u8; 6];
        let mut secret = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut id_bytes);
        rand::rngs::OsRng.fill_bytes(&mut secret);
        let key_id = hex::encode(id_bytes);
        let presented = format!("bzk_{key_id}_{}", hex::encode(secret));
        let record = KeyRecord {
            key_id: key_id.clone(),
            hash: Sha256::digest(presented.as_bytes()).into(),
            role,
            tenant,
            created_at: crate::actor::now_millis(),
        };
        self.store.defs.insert(key(&["key", &key_id]), encode(&record)).map_err(StorageError::from)?;
        self.store.flush_async().await?;
        self.keys.write().insert(key_id, record);
        Ok(presented)
    }

    pub fn tenant(&self, id: &Id) -> ServiceResult<Arc<TenantEntry>> {
        self.tenants.read().get(id).cloned().ok_or_else(|| ServiceError::not_found("tenant", id.as_str()))
    }

    pub fn tenant_ids(&self) -> Vec<Id> {
        self.tenants.read().keys().cloned().collect()
    }

    /// Creates a tenant; 409 if it exists.
    pub async fn create_tenant(&self, tenant: Tenant) -> ServiceResult<Tenant> {
        let storage_key = key(&["tenant", tenant.id.as_str()]);
        let inserted = self
            .store
            .defs
            .compare_and_swap(&storage_key, None as Option<&[u8]>, Some(encode(&tenant)))
            .map_err(StorageError::from)?;
        if inserted.is_err() {
            return Err(ServiceError::new(
                Code::AlreadyExists,
                format!("tenant {:?} already exists", tenant.id.as_str()),
            ));
        }
        self.store.flush_async().await?;
        self.tenants.write().insert(tenant.id.clone(), Arc::new(TenantEntry::new(tenant.clone())));
        Ok(tenant)
    }

    /// Stores the definition `kind`/`id` of `catalog` and swaps `catalog`
    /// in; returns the definition's new version. The caller holds the
    /// tenant's write lock and has validated the catalog (references exist).
    pub async fn put_def(&self, entry: &TenantEntry, kind: DefKind, id: &Id, catalog: Catalog) -> ServiceResult<u64> {
        let version = entry.version(kind, id) + 1;
        let updated_at = crate::actor::now_millis();
        fn stored<T: Serialize>(version: u64, updated_at: i64, def: Option<&T>) -> ServiceResult<Vec<u8>> {
            let def = def.ok_or_else(|| ServiceError::internal("the new catalog lacks the definition being stored"))?;
            Ok(encode(&StoredDef { version, updated_at, def }))
        }
        let value = match kind {
            DefKind::Store => stored(version, updated_at, catalog.stores.get(id))?,
            DefKind::Campaign => stored(version, updated_at, catalog.campaigns.get(id))?,
            DefKind::Wheel => stored(version, updated_at, catalog.wheels.get(id))?,
            DefKind::Jackpot => stored(version, updated_at, catalog.jackpots.get(id))?,
            DefKind::Mission => stored(version, updated_at, catalog.missions.get(id))?,
            DefKind::Leaderboard => stored(version, updated_at, catalog.leaderboards.get(id))?,
        };
        self.store
            .defs
            .insert(key(&["def", entry.tenant.id.as_str(), kind.as_str(), id.as_str()]), value)
            .map_err(StorageError::from)?;
        self.store.flush_async().await?;
        *entry.catalog.write() = Arc::new(catalog);
        entry.versions.write().insert((kind.as_str(), id.clone()), version);
        Ok(version)
    }
}

fn insert<T: serde::de::DeserializeOwned>(
    map: &mut std::collections::BTreeMap<Id, T>,
    id: Id,
    value: &[u8],
) -> Result<u64, StorageError> {
    let stored: StoredDef<T> = decode(value)?;
    map.insert(id, stored.def);
    Ok(stored.version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keys_authenticate_only_as_themselves() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let tenancy = Tenancy::load(store.clone(), Some("bootstrap-admin-key-0123456789")).expect("load");
        let mall = Id::parse("mall").expect("valid");
        let pos = tenancy.create_key(Role::Pos, Some(mall.clone())).await.expect("created");
        let principal = tenancy.authenticate(Some(&pos)).expect("known key");
        assert_eq!((principal.role, principal.tenant.clone()), (Role::Pos, Some(mall.clone())));
        let mut forged = pos.clone();
        forged.pop();
        forged.push(if pos.ends_with('0') { '1' } else { '0' });
        assert_eq!(tenancy.authenticate(Some(&forged)).map_err(|e| e.code), Err(Code::Unauthenticated));
        assert_eq!(tenancy.authenticate(None).map_err(|e| e.code), Err(Code::Unauthenticated));
        // Verified once, a key is known by its tag from then on; a near
        // miss still is not, and a refused key is not remembered.
        assert_eq!(tenancy.authenticate(Some(&pos)).expect("known key, remembered"), principal);
        assert_eq!(tenancy.authenticate(Some(&forged)).map_err(|e| e.code), Err(Code::Unauthenticated));
        assert_eq!(tenancy.verified.read().len(), 1);
        assert!(!tenancy.verified.read().contains_key(&tenancy.tag(&forged)));
        let admin = tenancy.authenticate(Some("bootstrap-admin-key-0123456789")).expect("bootstrap admin");
        assert_eq!(admin.role, Role::Admin);
        // Keys survive a restart, and only their hashes are stored.
        drop(tenancy);
        let raw: Vec<u8> = store.defs.iter().values().flat_map(|v| v.expect("read").to_vec()).collect();
        let secret = pos.rsplit('_').next().expect("secret part");
        assert!(!raw.windows(secret.len()).any(|w| w == secret.as_bytes()));
        let reloaded = Tenancy::load(store, None).expect("reload");
        assert!(reloaded.authenticate(Some(&pos)).is_ok());
        assert!(reloaded.authenticate(Some("bootstrap-admin-key-0123456789")).is_err());
    }

    #[test]
    fn roles_and_tenants_are_enforced() {
        let mall = Id::parse("mall").expect("valid");
        let other = Id::parse("other").expect("valid");
        let pos = Principal { role: Role::Pos, tenant: Some(mall.clone()), key_id: "k".into() };
        assert!(pos.require(&mall, &[Role::Pos]).is_ok());
        assert_eq!(pos.require(&other, &[Role::Pos]).map_err(|e| e.code), Err(Code::PermissionDenied));
        assert_eq!(pos.require(&mall, &[Role::Operator]).map_err(|e| e.code), Err(Code::PermissionDenied));
        let admin = Principal { role: Role::Admin, tenant: None, key_id: "k".into() };
        assert!(admin.require(&other, &[]).is_ok());
    }
}
