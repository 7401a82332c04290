-- A real C program's allocation pattern: sqlite3 building, indexing, querying and
-- deleting 100,000 rows in memory. Run as: sqlite3 :memory: < sqlite_churn.sql
.timer on
CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, grp INTEGER, payload BLOB);
WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 100000)
  INSERT INTO t SELECT x, 'name-' || x, x % 97, randomblob(x % 200) FROM c;
CREATE INDEX t_name ON t(name);
SELECT grp, count(*), sum(length(payload)) FROM t GROUP BY grp ORDER BY 2 DESC LIMIT 1;
SELECT count(*) FROM t WHERE name LIKE 'name-1%';
DELETE FROM t WHERE id % 2 = 0;
SELECT count(*) FROM t;
