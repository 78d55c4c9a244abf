"""Users of SQL databases, as Azure SQL's contained users: `CREATE USER … WITH PASSWORD` and
`CREATE USER … FROM EXTERNAL PROVIDER` (Entra principals signing in with an access token of this
platform) made in a database reach that database only; the administrators reach every database.
Driven with psycopg against a real server.
"""

import psycopg
import pytest

from conftest import DEFAULT_RG, create_sp
from test_sql import ADMIN, PASSWORD, arm, connect, create_db, create_server, ok, sql_path


def token_of(srv, sp):
    from azure.identity import ClientSecretCredential

    cred = ClientSecretCredential(sp["tenantId"], sp["clientId"], sp["clientSecret"],
                                  authority=srv.admin.get("authority", srv.base), disable_instance_discovery=True,
                                  connection_verify=str(srv.ca_path))
    return cred.get_token(srv.scope).token


def admin_exec(srv, server, db, sql):
    with connect(srv, server, db) as c:
        c.execute(sql)


def test_contained_users_reach_their_own_database_only(kagi):
    srv = kagi
    srv.put_rg(DEFAULT_RG)
    server, _ = create_server(srv, identity=False)
    a, _ = create_db(srv, server)
    b, _ = create_db(srv, server)

    # A SQL user made in database a.
    admin_exec(srv, server, a, "CREATE USER carol WITH PASSWORD 'C4rol-pass!'")
    with connect(srv, server, a, user="carol", password="C4rol-pass!") as c:
        assert c.execute("SELECT 1").fetchone()[0] == 1
        # Only the administrator makes users.
        with pytest.raises(psycopg.Error) as e:
            c.execute("CREATE USER dave WITH PASSWORD 'D4ve-pass!'")
        assert e.value.sqlstate == "42501"
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(srv, server, b, user="carol", password="C4rol-pass!")
    with pytest.raises(psycopg.Error) as e:
        admin_exec(srv, server, a, "CREATE USER carol WITH PASSWORD 'x-Y-z-123'")
    assert e.value.sqlstate == "42710"
    admin_exec(srv, server, a, "ALTER USER carol WITH PASSWORD 'N3w-pass!'")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(srv, server, a, user="carol", password="C4rol-pass!")
    with connect(srv, server, a, user="carol", password="N3w-pass!") as c:
        assert c.execute("SELECT 2").fetchone()[0] == 2

    # Entra users: a service principal by its client id, another by a name and its object id.
    sp1, sp2, sp3 = create_sp(srv), create_sp(srv), create_sp(srv)
    admin_exec(srv, server, a, f'CREATE USER "{sp1["clientId"]}" FROM EXTERNAL PROVIDER')
    admin_exec(srv, server, a, f"CREATE USER \"reporting-app\" FROM EXTERNAL PROVIDER WITH OBJECT_ID = '{sp2['objectId']}'")
    t1, t2, t3 = token_of(srv, sp1), token_of(srv, sp2), token_of(srv, sp3)
    with connect(srv, server, a, user=sp1["clientId"], password=t1) as c:
        assert c.execute("SELECT 3").fetchone()[0] == 3
    with connect(srv, server, a, user="reporting-app", password=t2) as c:
        assert c.execute("SELECT 4").fetchone()[0] == 4
    # Another principal's token, the wrong database, a password instead of a token: refused.
    for user, password, db in [("reporting-app", t3, a), (sp1["clientId"], t2, a), (sp1["clientId"], t1, b),
                               ("reporting-app", "not-a-token", a)]:
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            connect(srv, server, db, user=user, password=password)
    with pytest.raises(psycopg.Error) as e:
        admin_exec(srv, server, a, "CREATE USER bad FROM EXTERNAL PROVIDER WITH OBJECT_ID = 'nope'")
    assert e.value.sqlstate == "22023"
    with pytest.raises(psycopg.Error):
        admin_exec(srv, server, a, "ALTER USER \"reporting-app\" WITH PASSWORD 'P4ss-word!'")

    # Dropped users are gone; the administrator reaches every database; dropping a database
    # drops its users.
    admin_exec(srv, server, a, "DROP USER carol")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(srv, server, a, user="carol", password="N3w-pass!")
    with connect(srv, server, b, user=ADMIN, password=PASSWORD) as c:
        assert c.execute("SELECT 5").fetchone()[0] == 5
    ok(arm(srv, "DELETE", sql_path(srv, server, f"/databases/{a}")), 200, 204)
    create_db(srv, server, a)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(srv, server, a, user=sp1["clientId"], password=t1)
