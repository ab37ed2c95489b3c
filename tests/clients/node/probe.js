// node-postgres through the gateway: one scenario per run, results printed as key=value lines.
//
// Usage: node probe.js <scenario> [table with an ssn column], with `pg` on NODE_PATH and the connection in the
// environment: PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD (the token), and PROBE_SSL
// ("off", "require": TLS without verification, or a CA file: TLS verified against it).
// Anything a scenario did not expect ends the run with exit code 1 and an "unexpected=" line;
// the Python tests assert on the printed values.

'use strict'

const fs = require('fs')
const { Client, Pool, Query } = require('pg')

function config (extra = {}) {
  const mode = process.env.PROBE_SSL || 'off'
  let ssl = false
  if (mode === 'require') ssl = { rejectUnauthorized: false }
  else if (mode !== 'off') ssl = { ca: fs.readFileSync(mode), rejectUnauthorized: true }
  return {
    host: process.env.PGHOST,
    port: Number(process.env.PGPORT),
    database: process.env.PGDATABASE,
    user: process.env.PGUSER,
    password: process.env.PGPASSWORD,
    ssl,
    connectionTimeoutMillis: 10000,
    ...extra
  }
}

function out (key, value) {
  console.log(`${key}=${typeof value === 'string' ? value : JSON.stringify(value)}`)
}

async function expectError (key, body) {
  try {
    await body()
    out(key, 'no error')
  } catch (err) {
    out(`${key}.code`, err.code ?? null)
    out(`${key}.message`, String(err.message).replace(/\n/g, ' '))
  }
}

async function withClient (body, extra = {}) {
  const client = new Client(config(extra))
  await client.connect()
  try {
    await body(client)
  } finally {
    await client.end()
  }
}

const scenarios = {
  async connect () {
    await expectError('connect', async () => {
      await withClient(async (c) => out('connected', (await c.query("select 'yes' as v")).rows[0].v))
    })
  },

  async basic () {
    await withClient(async (c) => {
      const stream = c.connection.stream
      out('tls', stream.encrypted ? stream.getProtocol() : 'none')
      out('select', (await c.query('select 40 + 2 as n')).rows[0].n)
      // Parameters go through Parse/Bind/Execute; arrays, json, bytea, dates, big numbers.
      const when = new Date(Date.UTC(2024, 1, 29, 12, 30, 15, 123))
      const r = await c.query(
        'select $1::int8 + 1 as n, $2::text as t, $3::numeric as d, $4::timestamptz as ts,' +
        ' $5::bytea as b, $6::int4[] as a, $7::jsonb as j, $8::text as nul, $9::text[] as ta,' +
        ' $10::uuid as u, $11::json as js',
        ['1099511627776', 'héllo ✓', '12345.6789', when, Buffer.from([0, 255, 16]),
          [1, null, 3], { k: [1, 2] }, null, ['a', 'b,c', 'd"e'],
          '6f1c8a5e-2f7b-4a8e-9d3c-0b1e2f3a4b5c', JSON.stringify([{ x: 1 }])])
      const row = r.rows[0]
      out('n', row.n)
      out('t', row.t)
      out('d', row.d)
      out('ts', row.ts.toISOString())
      out('b', row.b.toString('hex'))
      out('a', row.a)
      out('j', row.j)
      out('nul', row.nul)
      out('ta', row.ta)
      out('u', row.u)
      out('js', row.js)
      // Named prepared statements: parsed once, then only bound and executed.
      const squares = []
      for (let i = 1; i <= 8; i++) {
        const q = await c.query({ name: 'square', text: 'select $1::int * $1::int as sq', values: [i] })
        squares.push(q.rows[0].sq)
      }
      out('squares', squares)
      const arr = await c.query({ text: 'select 1 as a, 2 as b', rowMode: 'array' })
      out('row_mode_array', arr.rows)
      // Without parameters a query is a simple Query message: several statements at once.
      const multi = await c.query("select 1 as one; select 'two' as two")
      out('multi', multi.map((res) => res.rows[0]))
      await expectError('undefined', () => c.query('select * from no_such_table'))
      await expectError('division', () => c.query({ name: 'div', text: 'select 10 / $1::int as q', values: [0] }))
      out('division_again', (await c.query({ name: 'div', text: 'select 10 / $1::int as q', values: [5] })).rows[0].q)
      await c.query('begin')
      await c.query('create temp table t (v int)')
      await c.query('insert into t values ($1), ($2)', [1, 2])
      await c.query('rollback')
      await expectError('rolled_back', () => c.query('select * from t'))
      await c.query('begin')
      await c.query('create temp table t (v int)')
      await c.query('insert into t values ($1)', [7])
      await c.query('commit')
      out('committed', (await c.query('select sum(v)::int as s from t')).rows[0].s)
    })
  },

  async pipeline () {
    // pg's pipeline mode: many queries on the wire before the first answer comes back.
    // With "blocked", a named statement the policy refuses is used four times: pg sends
    // its Parse once and only binds it afterwards, before any answer arrived.
    const blocked = process.argv[3] === 'blocked'
    await withClient(async (c) => {
      if (blocked) await c.query('create temp table keepme (v int)')
      const refused = (i) => blocked && i % 50 === 25
      const jobs = []
      for (let i = 0; i < 200; i++) {
        if (i === 100) jobs.push(c.query('select 1 / $1::int as v', [0]).catch((e) => e.code))
        else if (refused(i)) {
          jobs.push(c.query({ name: 'dropper', text: 'drop table keepme' })
            .then(() => 'ran', (e) => e.code))
        } else jobs.push(c.query('select $1::int as v', [i]).then((r) => r.rows[0].v))
      }
      const got = await Promise.all(jobs)
      const wrong = got.map((v, i) => [i, v]).filter(([i, v]) =>
        v !== (i === 100 ? '22012' : refused(i) ? '42501' : i))
      out('pipelined', wrong.length === 0)
      out('pipelined_wrong', wrong.slice(0, 5))
      out('pipelined_error', got[100])
    }, { pipeline: true })
  },

  async pool () {
    const pool = new Pool(config({ max: 4 }))
    try {
      const jobs = []
      for (let i = 0; i < 40; i++) {
        jobs.push(pool.query('select $1::int * 2 as v, pg_backend_pid() as pid', [i]))
      }
      const results = await Promise.all(jobs)
      out('pool_values', results.every((r, i) => r.rows[0].v === i * 2))
      out('pool_backends', new Set(results.map((r) => r.rows[0].pid)).size)
      const client = await pool.connect()
      try {
        await client.query('begin')
        out('pool_tx', (await client.query("select 'in tx' as v")).rows[0].v)
        await client.query('commit')
      } finally {
        client.release()
      }
    } finally {
      await pool.end()
    }
  },

  async cancel () {
    await withClient(async (c) => {
      const started = Date.now()
      const q = c.query(new Query('select pg_sleep(30)'))
      const failed = new Promise((resolve) => {
        q.on('error', (err) => resolve(err))
        q.on('end', () => resolve(null))
      })
      await new Promise((resolve) => setTimeout(resolve, 700))
      // pg's own cancel: a second connection (TLS too when the session is) that sends
      // the client's BackendKeyData.
      new Client(config()).cancel(c, q)
      const err = await failed
      out('cancel.code', err ? err.code : 'completed')
      out('cancel_ms', Date.now() - started)
      out('after_cancel', (await c.query("select 'alive' as v")).rows[0].v)
    })
  },

  async policy () {
    await withClient(async (c) => {
      await c.query('create temp table keepme (v int)')
      await expectError('simple', () => c.query('drop table keepme'))
      await expectError('named', () => c.query({ name: 'dropper', text: 'drop table keepme' }))
      await expectError('named_again', () => c.query({ name: 'dropper', text: 'drop table keepme' }))
      await expectError('params', () => c.query('drop table keepme -- $1', []))
      out('after', (await c.query('select count(*)::int as n from keepme')).rows[0].n)
      await c.query('begin')
      await expectError('in_tx', () => c.query('drop table keepme'))
      await expectError('aborted', () => c.query('select 1'))
      await c.query('rollback')
      out('after_tx', (await c.query('select count(*)::int as n from keepme')).rows[0].n)
    })
  },

  async mask () {
    const table = process.argv[3]
    await withClient(async (c) => {
      out('simple', (await c.query(`select ssn from ${table} where id = 1`)).rows[0].ssn)
      const who = { name: 'who', text: `select ssn, name from ${table} where id = $1`, values: [1] }
      out('prepared', (await c.query(who)).rows[0])
      const again = await c.query(who)
      out('prepared_again', again.rows[0])
    })
  },

  async expiry () {
    // A session whose token runs out mid-session is closed with a FATAL the client sees.
    const client = new Client(config())
    const ended = new Promise((resolve) => client.on('error', (err) => resolve(err)))
    await client.connect()
    out('before', (await client.query("select 'ok' as v")).rows[0].v)
    const err = await Promise.race([ended, new Promise((resolve) => setTimeout(() => resolve(null), 20000))])
    out('expired.code', err ? err.code ?? null : 'still open')
    out('expired.message', err ? String(err.message) : '')
    await client.end().catch(() => {})
  }
}

async function main () {
  const name = process.argv[2]
  if (!scenarios[name]) throw new Error(`no scenario ${name}`)
  await scenarios[name]()
}

main().catch((err) => {
  out('unexpected', `${err.code ?? ''} ${err.message}`)
  process.exit(1)
})
