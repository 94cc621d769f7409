//! Tenant and role isolation: every role of two tenants against every
//! kind of operation of both tenants. A key of one tenant never reads or
//! writes another tenant's data; a role does only what API.md grants it.

use bazaar_tests::{default_jackpot, Client, Mall, Node};
use serde_json::json;

/// What a call answers when it is allowed (spins answer 409 because the
/// customer has no entitlement: the request got past the auth checks).
struct Operation {
    name: &'static str,
    allowed_status: u16,
    roles: &'static [&'static str],
    call: fn(&Client, &str, usize) -> u16,
}

const OPERATIONS: &[Operation] = &[
    Operation {
        name: "read tenant",
        allowed_status: 200,
        roles: &["operator", "pos", "display"],
        call: |c, t, _| c.get(&format!("/v1/tenants/{t}")).status,
    },
    Operation {
        name: "create key",
        allowed_status: 201,
        roles: &["operator"],
        call: |c, t, _| c.post(&format!("/v1/tenants/{t}/keys"), json!({"role": "display"})).status,
    },
    Operation {
        name: "put store",
        allowed_status: 200,
        roles: &["operator"],
        call: |c, t, n| {
            c.put(&format!("/v1/tenants/{t}/stores/s-new-{n}"), json!({"name": "New", "category": "food"})).status
        },
    },
    Operation {
        name: "put leaderboard",
        allowed_status: 200,
        roles: &["operator"],
        call: |c, t, n| {
            c.put(&format!("/v1/tenants/{t}/leaderboards/l-{n}"), json!({"campaign": "bf", "metric": "spend"})).status
        },
    },
    Operation {
        name: "record event",
        allowed_status: 200,
        roles: &["pos"],
        call: |c, t, n| {
            c.post(&format!("/v1/tenants/{t}/events"), Mall::purchase(&format!("iso-{n}"), "c-iso", "s-1", 100)).status
        },
    },
    Operation {
        name: "record batch",
        allowed_status: 200,
        roles: &["pos"],
        call: |c, t, n| {
            let events = json!({"events": [Mall::purchase(&format!("iso-b-{n}"), "c-iso", "s-1", 100)]});
            c.post(&format!("/v1/tenants/{t}/events/batch"), events).status
        },
    },
    Operation {
        name: "spin",
        allowed_status: 409,
        roles: &["pos"],
        call: |c, t, n| {
            c.post(
                &format!("/v1/tenants/{t}/wheels/w-main/spins"),
                json!({"customer": "c-poor", "request_id": format!("r-{n}")}),
            )
            .status
        },
    },
    Operation {
        name: "read customer",
        allowed_status: 200,
        roles: &["operator", "pos"],
        call: |c, t, _| c.get(&format!("/v1/tenants/{t}/customers/c-seed")).status,
    },
    Operation {
        name: "read jackpot",
        allowed_status: 200,
        roles: &["operator", "pos", "display"],
        call: |c, t, _| c.get(&format!("/v1/tenants/{t}/jackpots/j-mall")).status,
    },
    Operation {
        name: "read leaderboard",
        allowed_status: 200,
        roles: &["operator", "pos", "display"],
        call: |c, t, _| c.get(&format!("/v1/tenants/{t}/leaderboards/lb-spend")).status,
    },
    Operation {
        name: "read rank",
        allowed_status: 200,
        roles: &["operator", "pos", "display"],
        call: |c, t, _| c.get(&format!("/v1/tenants/{t}/leaderboards/lb-spend/customers/c-seed")).status,
    },
];

#[test]
fn every_role_of_two_tenants_against_every_operation() {
    let node = Node::start(&[]);
    let malls = [Mall::create(&node, "north", default_jackpot()), Mall::create(&node, "south", default_jackpot())];
    for mall in &malls {
        mall.pos.post(&mall.path("events"), Mall::purchase("seed", "c-seed", "s-1", 5_000)).expect(200);
    }
    let admin = node.admin();
    let mut call_number = 0;
    let mut failures = Vec::new();
    for operation in OPERATIONS {
        for (home, mall) in malls.iter().enumerate() {
            let keys = [("operator", &mall.operator), ("pos", &mall.pos), ("display", &mall.display)];
            for (role, client) in keys {
                for (target, target_mall) in malls.iter().enumerate() {
                    call_number += 1;
                    let status = (operation.call)(client, &target_mall.tenant, call_number);
                    let allowed = home == target && operation.roles.contains(&role);
                    let expected = if allowed { operation.allowed_status } else { 403 };
                    if status != expected {
                        failures.push(format!(
                            "{} key of {} on {}: {} answered {status}, expected {expected}",
                            role, mall.tenant, target_mall.tenant, operation.name
                        ));
                    }
                }
            }
        }
        for mall in &malls {
            call_number += 1;
            let status = (operation.call)(&admin, &mall.tenant, call_number);
            if status != operation.allowed_status {
                failures.push(format!("admin on {}: {} answered {status}", mall.tenant, operation.name));
            }
            for (label, client) in
                [("no key", node.client(None)), ("unknown key", node.client(Some("bzk_000000000000_00")))]
            {
                call_number += 1;
                let status = (operation.call)(&client, &mall.tenant, call_number);
                if status != 401 {
                    failures.push(format!(
                        "{label} on {}: {} answered {status}, expected 401",
                        mall.tenant, operation.name
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} isolation failures:\n{}", failures.len(), failures.join("\n"));

    // Only admins create tenants and admin keys.
    for client in [&malls[0].operator, &malls[0].pos, &malls[0].display] {
        client.post("/v1/tenants", json!({"id": "east", "name": "East", "currency": "EUR"})).expect_error(
            403,
            "permission_denied",
            None,
        );
    }
    malls[0].operator.post(&malls[0].path("keys"), json!({"role": "admin"})).expect_error(
        403,
        "permission_denied",
        None,
    );

    // A tenant's data stays its own: each tenant's c-iso got exactly the
    // four purchases sent to that tenant (an event and a batch from its pos
    // key and from the admin), and a customer of north is unknown in south.
    for mall in &malls {
        let customer = mall.pos.get(&mall.path("customers/c-iso")).expect(200);
        assert_eq!(customer["stats"]["purchases"], 4, "{}: {customer}", mall.tenant);
    }
    malls[0].pos.post(&malls[0].path("events"), Mall::purchase("only-north", "c-north", "s-1", 100)).expect(200);
    malls[0].pos.get(&malls[0].path("customers/c-north")).expect(200);
    malls[1].pos.get(&malls[1].path("customers/c-north")).expect_error(404, "not_found", None);
}
