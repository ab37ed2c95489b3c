// pgjdbc through the gateway: one scenario per run, results printed as key=value lines.
//
// Usage: java -cp postgresql.jar Probe.java <scenario> <jdbc-url> [table with an ssn column]
// The token comes from the environment (HOOPOPS_TOKEN) so it never shows in a process list.
// Anything a scenario did not expect ends the run with exit code 1 and an "unexpected=" line;
// the Python tests assert on the printed values, so the probe itself decides nothing.

import java.io.StringReader;
import java.io.StringWriter;
import java.math.BigDecimal;
import java.sql.Array;
import java.sql.BatchUpdateException;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Savepoint;
import java.sql.Statement;
import java.time.LocalDate;
import java.time.OffsetDateTime;
import java.time.ZoneOffset;
import java.util.ArrayList;
import java.util.HexFormat;
import java.util.List;
import java.util.Properties;
import java.util.UUID;

import org.postgresql.PGConnection;
import org.postgresql.copy.CopyManager;

public class Probe {
    static String people = "people";

    public static void main(String[] args) throws Exception {
        String scenario = args[0];
        String url = args[1];
        if (args.length > 2) {
            people = args[2];
        }
        Properties props = new Properties();
        props.setProperty("user", "agent");
        props.setProperty("password", System.getenv().getOrDefault("HOOPOPS_TOKEN", ""));
        props.setProperty("connectTimeout", "10");
        props.setProperty("socketTimeout", "60");
        try {
            if (scenario.equals("connect")) {
                connectOnly(url, props);
                return;
            }
            try (Connection conn = DriverManager.getConnection(url, props)) {
                switch (scenario) {
                    case "basic" -> basic(conn);
                    case "prepared" -> prepared(conn);
                    case "fetch" -> fetch(conn);
                    case "batch" -> batch(conn);
                    case "tx" -> tx(conn);
                    case "copy" -> copy(conn);
                    case "cancel" -> cancel(conn);
                    case "policy" -> policy(conn);
                    case "mask" -> mask(conn);
                    case "ddl_tx" -> ddlTx(conn);
                    default -> throw new IllegalArgumentException("no scenario " + scenario);
                }
            }
        } catch (SQLException e) {
            out("unexpected", e.getSQLState() + " " + e.getMessage());
            System.exit(1);
        }
    }

    static void out(String key, Object value) {
        System.out.println(key + "=" + value);
    }

    static String one(Connection conn, String sql) throws SQLException {
        try (Statement st = conn.createStatement(); ResultSet rs = st.executeQuery(sql)) {
            rs.next();
            return rs.getString(1);
        }
    }

    /** A statement that must fail: prints its SQLSTATE and message under ``key``. */
    interface Failing {
        void run() throws SQLException;
    }

    static void expectError(String key, Failing body) {
        try {
            body.run();
            out(key, "no error");
        } catch (SQLException e) {
            out(key + ".sqlstate", e.getSQLState());
            out(key + ".message", e.getMessage().replace('\n', ' '));
        }
    }

    static void connectOnly(String url, Properties props) {
        try (Connection conn = DriverManager.getConnection(url, props)) {
            out("connected", one(conn, "select 'yes'"));
        } catch (SQLException e) {
            out("connect.sqlstate", e.getSQLState());
            out("connect.message", e.getMessage().replace('\n', ' '));
        }
    }

    static void basic(Connection conn) throws SQLException {
        out("select", one(conn, "select 40 + 2"));
        out("ssl", one(conn, "select ssl from pg_stat_ssl where pid = pg_backend_pid()"));
        try (Statement st = conn.createStatement()) {
            // Several statements in one simple query: pgjdbc splits them and reads each result.
            boolean isResult = st.execute("select 1 as a; select 'two' as b; create temp table t (x int)");
            List<String> seen = new ArrayList<>();
            while (true) {
                if (isResult) {
                    try (ResultSet rs = st.getResultSet()) {
                        rs.next();
                        seen.add(rs.getString(1));
                    }
                } else if (st.getUpdateCount() == -1) {
                    break;
                } else {
                    seen.add("update:" + st.getUpdateCount());
                }
                isResult = st.getMoreResults();
            }
            out("multi", String.join(",", seen));
        }
        expectError("undefined", () -> one(conn, "select * from no_such_table"));
        out("after_error", one(conn, "select 'still here'"));
        out("meta_tables", conn.getMetaData().getTables(null, "pg_catalog", "pg_class", null).next());
    }

    static void prepared(Connection conn) throws SQLException {
        // Past prepareThreshold pgjdbc switches to a named server-side statement (and with
        // prepareThreshold=-1 uses one from the first execution).
        StringBuilder squares = new StringBuilder();
        try (PreparedStatement ps = conn.prepareStatement("select ?::int * ?::int, ?::text")) {
            for (int i = 1; i <= 12; i++) {
                ps.setInt(1, i);
                ps.setInt(2, i);
                ps.setString(3, "n" + i);
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    squares.append(rs.getInt(1)).append(':').append(rs.getString(2)).append(' ');
                }
            }
        }
        out("squares", squares.toString().trim());
        OffsetDateTime when = OffsetDateTime.of(2024, 2, 29, 12, 30, 15, 123456000, ZoneOffset.UTC);
        UUID ident = UUID.fromString("6f1c8a5e-2f7b-4a8e-9d3c-0b1e2f3a4b5c");
        byte[] blob = {0, (byte) 0xff, 0x10, 0x27};
        try (PreparedStatement ps = conn.prepareStatement(
                "select ?::timestamptz, ?::uuid, ?::numeric, ?::bytea, ?::date, ?::text, ?::int4[],"
                + " ?::int8, ?::float8, ?::jsonb")) {
            Array arr = conn.createArrayOf("int4", new Integer[] {1, null, 3});
            for (int i = 0; i < 7; i++) {
                ps.setObject(1, when);
                ps.setObject(2, ident);
                ps.setBigDecimal(3, new BigDecimal("12345.6789"));
                ps.setBytes(4, blob);
                ps.setObject(5, LocalDate.of(2000, 1, 1));
                ps.setNull(6, java.sql.Types.VARCHAR);
                ps.setArray(7, arr);
                ps.setLong(8, 1L << 40);
                ps.setDouble(9, 1.5);
                ps.setString(10, "{\"k\": [1, 2]}");
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    if (i < 6) {
                        continue;
                    }
                    out("ts", rs.getObject(1, OffsetDateTime.class));
                    out("uuid", rs.getObject(2));
                    out("numeric", rs.getBigDecimal(3));
                    out("bytea", HexFormat.of().formatHex(rs.getBytes(4)));
                    out("date", rs.getObject(5, LocalDate.class));
                    out("null", rs.getString(6) == null);
                    Integer[] got = (Integer[]) rs.getArray(7).getArray();
                    out("array", java.util.Arrays.toString(got));
                    out("int8", rs.getLong(8));
                    out("float8", rs.getDouble(9));
                    out("jsonb", rs.getString(10));
                }
            }
        }
        // An error in a server-prepared statement does not poison its next use.
        try (PreparedStatement ps = conn.prepareStatement("select 10 / ?::int")) {
            StringBuilder got = new StringBuilder();
            for (int d : new int[] {1, 2, 5, 1, 2, 0, 5, 10}) {
                ps.setInt(1, d);
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    got.append(rs.getInt(1)).append(' ');
                } catch (SQLException e) {
                    got.append(e.getSQLState()).append(' ');
                }
            }
            out("division", got.toString().trim());
        }
        // DDL invalidating a cached plan: pgjdbc re-prepares after "cached plan must not change".
        try (Statement st = conn.createStatement()) {
            st.execute("create temp table shape (a int)");
            st.execute("insert into shape values (1)");
        }
        try (PreparedStatement ps = conn.prepareStatement("select * from shape")) {
            StringBuilder got = new StringBuilder();
            for (int i = 0; i < 8; i++) {
                if (i == 6) {
                    try (Statement st = conn.createStatement()) {
                        st.execute("alter table shape add column b text default 'b'");
                    }
                }
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    got.append(rs.getMetaData().getColumnCount()).append(' ');
                }
            }
            out("reshaped", got.toString().trim());
        }
    }

    static void fetch(Connection conn) throws SQLException {
        conn.setAutoCommit(false);
        // setFetchSize inside a transaction: a portal read in Execute(max rows) slices.
        long total = 0;
        int count = 0;
        try (Statement st = conn.createStatement()) {
            st.setFetchSize(100);
            try (ResultSet rs = st.executeQuery("select g from generate_series(1, 10000) g")) {
                while (rs.next()) {
                    total += rs.getLong(1);
                    count++;
                }
            }
        }
        out("fetched", count + " " + total);
        // Two portals open at once, read alternately.
        try (PreparedStatement a = conn.prepareStatement("select g from generate_series(1, ?) g");
             PreparedStatement b = conn.prepareStatement("select 'b' || g from generate_series(1, 500) g")) {
            a.setFetchSize(7);
            b.setFetchSize(11);
            a.setInt(1, 300);
            StringBuilder got = new StringBuilder();
            try (ResultSet ra = a.executeQuery(); ResultSet rb = b.executeQuery()) {
                int n = 0;
                while (ra.next() && rb.next()) {
                    n++;
                    if (n % 100 == 0) {
                        got.append(ra.getInt(1)).append('/').append(rb.getString(1)).append(' ');
                    }
                }
                out("interleaved_rows", n);
            }
            out("interleaved", got.toString().trim());
        }
        conn.commit();
        conn.setAutoCommit(true);
        out("after", one(conn, "select 'ok'"));
    }

    static void batch(Connection conn) throws SQLException {
        try (Statement st = conn.createStatement()) {
            st.execute("create temp table b (id int primary key, v text)");
        }
        try (PreparedStatement ps = conn.prepareStatement("insert into b values (?, ?)")) {
            for (int i = 1; i <= 1000; i++) {
                ps.setInt(1, i);
                ps.setString(2, "v" + i);
                ps.addBatch();
            }
            int[] counts = ps.executeBatch();
            int sum = 0;
            for (int c : counts) {
                sum += c;
            }
            out("batch", counts.length + " " + sum);
        }
        out("rows", one(conn, "select count(*) || ' ' || sum(id) from b"));
        // A failing batch inside a transaction: the whole batch rolls back.
        conn.setAutoCommit(false);
        try (PreparedStatement ps = conn.prepareStatement("insert into b values (?, ?)")) {
            for (int id : new int[] {2001, 2002, 1, 2003}) {
                ps.setInt(1, id);
                ps.setString(2, "dup");
                ps.addBatch();
            }
            ps.executeBatch();
            out("failing_batch", "no error");
        } catch (BatchUpdateException e) {
            SQLException next = e.getNextException();
            out("failing_batch.sqlstate", next != null ? next.getSQLState() : e.getSQLState());
        }
        conn.rollback();
        conn.setAutoCommit(true);
        out("rows_after_failure", one(conn, "select count(*) from b"));
        // A statement batch (simple protocol statements in one Sync group).
        try (Statement st = conn.createStatement()) {
            st.addBatch("insert into b values (3001, 'x')");
            st.addBatch("update b set v = 'y' where id <= 10");
            st.addBatch("delete from b where id = 3001");
            int[] counts = st.executeBatch();
            out("statement_batch", java.util.Arrays.toString(counts));
        }
    }

    static void tx(Connection conn) throws SQLException {
        try (Statement st = conn.createStatement()) {
            st.execute("create temp table t (v int)");
        }
        conn.setAutoCommit(false);
        try (Statement st = conn.createStatement()) {
            st.execute("insert into t values (1)");
            conn.rollback();
            out("after_rollback", one(conn, "select count(*) from t"));
            st.execute("insert into t values (2)");
            conn.commit();
            Savepoint sp = conn.setSavepoint("sp1");
            st.execute("insert into t values (3)");
            conn.rollback(sp);
            st.execute("insert into t values (4)");
            conn.commit();
            out("committed", one(conn, "select string_agg(v::text, ',' order by v) from t"));
            expectError("in_tx", () -> one(conn, "select 1/0"));
            expectError("aborted", () -> one(conn, "select 1"));
            conn.rollback();
            out("after_abort", one(conn, "select 'usable'"));
            conn.commit();
        }
        conn.setAutoCommit(true);
        out("isolation", conn.getTransactionIsolation());
    }

    static void copy(Connection conn) throws Exception {
        CopyManager cm = conn.unwrap(PGConnection.class).getCopyAPI();
        try (Statement st = conn.createStatement()) {
            st.execute("create temp table cp (id int, name text)");
        }
        StringBuilder data = new StringBuilder();
        for (int i = 0; i < 5000; i++) {
            data.append(i).append('\t').append("name-").append(i).append('\n');
        }
        long in = cm.copyIn("copy cp from stdin", new StringReader(data.toString()));
        out("copy_in", in);
        StringWriter w = new StringWriter();
        long outRows = cm.copyOut("copy (select id, name from cp where id < 3 order by id) to stdout "
                + "with (format csv)", w);
        out("copy_out", outRows);
        out("copy_out_text", w.toString().replace("\n", "|"));
        expectError("copy_bad", () -> {
            try {
                cm.copyIn("copy cp from stdin", new StringReader("not-a-number\tx\n"));
            } catch (java.io.IOException e) {
                throw new SQLException(e);
            }
        });
        out("after", one(conn, "select count(*) from cp"));
    }

    static void cancel(Connection conn) throws Exception {
        long start = System.nanoTime();
        try (Statement st = conn.createStatement()) {
            st.setQueryTimeout(1);
            expectError("timeout", () -> st.execute("select pg_sleep(30)"));
        }
        out("timeout_ms", (System.nanoTime() - start) / 1_000_000);
        out("after_timeout", one(conn, "select 'alive'"));
        try (PreparedStatement ps = conn.prepareStatement("select pg_sleep(?)")) {
            ps.setInt(1, 30);
            Thread t = new Thread(() -> {
                try {
                    Thread.sleep(700);
                    ps.cancel();
                } catch (Exception e) {
                    System.out.println("cancel_thread=" + e);
                }
            });
            start = System.nanoTime();
            t.start();
            expectError("cancelled", ps::execute);
            t.join();
        }
        out("cancel_ms", (System.nanoTime() - start) / 1_000_000);
        out("after_cancel", one(conn, "select 'alive'"));
    }

    static void policy(Connection conn) throws SQLException {
        try (Statement st = conn.createStatement()) {
            st.execute("create temp table keepme (v int)");
            expectError("simple", () -> st.execute("drop table keepme"));
            out("after_simple", one(conn, "select count(*) from keepme"));
        }
        // Extended protocol, server-prepared (prepareThreshold=-1 in some runs).
        for (int i = 0; i < 2; i++) {
            try (PreparedStatement ps = conn.prepareStatement("drop table keepme")) {
                expectError("prepared" + i, ps::execute);
            }
        }
        out("after_prepared", one(conn, "select count(*) from keepme"));
        // Inside a transaction the refusal aborts it like any server error.
        conn.setAutoCommit(false);
        try (Statement st = conn.createStatement()) {
            st.execute("insert into keepme values (1)");
            expectError("in_tx", () -> st.execute("drop table keepme"));
            expectError("aborted", () -> one(conn, "select 1"));
            conn.rollback();
        }
        conn.setAutoCommit(true);
        // In a batch: the refusal fails the batch, the session goes on.
        try (Statement st = conn.createStatement()) {
            st.addBatch("insert into keepme values (2)");
            st.addBatch("drop table keepme");
            st.executeBatch();
            out("batch", "no error");
        } catch (BatchUpdateException e) {
            SQLException next = e.getNextException();
            out("batch.sqlstate", next != null ? next.getSQLState() : e.getSQLState());
        }
        out("after_all", one(conn, "select count(*) from keepme"));
    }

    static void ddlTx(Connection conn) throws SQLException {
        // Autocommit off, as most Java code runs: a table created, filled and committed in
        // one transaction reads back as stored once committed (the default policy).
        conn.setAutoCommit(false);
        try (Statement st = conn.createStatement()) {
            st.execute("create temp table made_in_tx (v int, name text, at date)");
            st.execute("insert into made_in_tx values (7, 'seven', '2024-01-02')");
        }
        conn.commit();
        try (PreparedStatement ps = conn.prepareStatement("select v, name, at from made_in_tx")) {
            try (ResultSet rs = ps.executeQuery()) {
                rs.next();
                out("row", rs.getString(1) + " " + rs.getString(2) + " " + rs.getString(3));
            }
        }
        out("sum", one(conn, "select sum(v) from made_in_tx"));
        conn.commit();
    }

    static void mask(Connection conn) throws SQLException {
        out("simple", one(conn, "select ssn from " + people + " order by id limit 1"));
        try (PreparedStatement ps = conn.prepareStatement(
                "select ssn, name from " + people + " where id = ?")) {
            for (int i = 0; i < 7; i++) {
                ps.setInt(1, 1);
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    if (i == 0 || i == 6) {
                        out("prepared" + i, rs.getString(1) + " " + rs.getString(2));
                    }
                }
            }
        }
    }
}
