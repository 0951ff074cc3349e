-- Example analyst queries over the pipeline's tables: `fmpipe sql --name <name> [--param k=v]`.
-- Views: raw_events, quarantine, tokens, history, title_vocab, catalogue, profile_embeddings,
-- title_embeddings (published days only; dt partitions are a column), publications, gate_results,
-- models, current_model, tokens_decoded and the lookups actions, devices, canvases, locales, hours,
-- weekdays (id, name). The same views in a file for any DuckDB client: `fmpipe sql --catalogue`.

-- name: tables_per_day
SELECT 'tokens' AS tbl, dt, count(*) AS n_rows FROM tokens GROUP BY dt
UNION ALL SELECT 'quarantine', dt, count(*) FROM quarantine GROUP BY dt
UNION ALL SELECT 'profile_embeddings', dt, count(*) FROM profile_embeddings GROUP BY dt
ORDER BY tbl, dt;

-- name: nearest_titles
-- The 10 titles closest (cosine) to $title (default t000001) in the latest title embeddings.
WITH latest AS (SELECT * FROM title_embeddings WHERE dt = (SELECT max(dt) FROM title_embeddings)),
     q AS (SELECT title_embedding AS v FROM latest WHERE title_id = coalesce($title, 't000001'))
SELECT l.title_id, c.name, c.genres, round(list_cosine_similarity(l.title_embedding, q.v), 4) AS cosine
FROM latest l CROSS JOIN q LEFT JOIN catalogue c ON c.title_id = l.title_id
ORDER BY cosine DESC LIMIT 10;

-- name: drift_per_day
-- Mean cosine between a profile's last-layer vector on a day and on its previous published day.
WITH e AS (SELECT profile_id, dt, model_version, emb_layer2_last AS v FROM profile_embeddings),
     pairs AS (SELECT a.dt, a.model_version, list_cosine_similarity(a.v, b.v) AS cos
               FROM e a JOIN e b ON a.profile_id = b.profile_id
               AND b.dt = (SELECT max(dt) FROM e x WHERE x.dt < a.dt))
SELECT dt, model_version, count(*) AS stable_profiles, round(avg(cos), 4) AS mean_cosine,
       round(quantile_cont(cos, 0.1), 4) AS p10_cosine
FROM pairs GROUP BY dt, model_version ORDER BY dt;

-- name: coverage_per_layer
-- Share of published profiles with a usable (non-null, non-empty) vector per layer and day.
SELECT dt, count(*) AS profiles,
       round(avg((len(emb_layer1_last) > 0)::INT), 4) AS layer1_last,
       round(avg((len(emb_layer2_last) > 0)::INT), 4) AS layer2_last,
       round(avg((len(emb_layer2_mean) > 0)::INT), 4) AS layer2_mean,
       round(avg(sqrt(list_sum(list_transform(emb_layer2_last, x -> x * x)))), 3) AS mean_norm_layer2
FROM profile_embeddings GROUP BY dt ORDER BY dt;

-- name: profile_history
-- A profile's most recent tokens ($profile, default 1) with title names, from the latest history state.
WITH h AS (SELECT * FROM history WHERE profile_id = coalesce($profile::BIGINT, 1)
           AND dt = (SELECT max(dt) FROM history)),
     t AS (SELECT unnest(ts) AS ts, unnest(title) AS title_idx, unnest(action) AS action_id,
                  unnest(device) AS device_id FROM h)
SELECT t.ts, v.title_id, c.name, t.action_id, t.device_id
FROM t LEFT JOIN title_vocab v ON v.idx = t.title_idx LEFT JOIN catalogue c USING (title_id)
ORDER BY t.ts DESC LIMIT 20;

-- name: quarantine_reasons
SELECT dt, reason, count(*) AS n FROM quarantine GROUP BY dt, reason ORDER BY dt, n DESC;

-- name: actions_per_canvas
-- What people did where on the latest day, by name (tokens_decoded: no integer ids to look up).
SELECT canvas, action, count(*) AS tokens, sum(n_events) AS events, count(DISTINCT profile_id) AS profiles
FROM tokens_decoded WHERE dt = (SELECT max(dt) FROM tokens_decoded)
GROUP BY canvas, action ORDER BY tokens DESC, canvas, action;

-- name: publication_audit
-- Every pointer move with the day's gate verdict and the model behind it (trained through, validation NDCG).
SELECT p.seq, p.action, CAST(p.date AS DATE) AS date, p.publication, g.success AS gate_passed,
       g.failed_suites, p.model_version, m.trained_through, round(m.valid_ndcg_10, 4) AS valid_ndcg_10,
       m.current AS model_serving_now
FROM publications p LEFT JOIN gate_results g ON g.date = CAST(p.date AS DATE)
LEFT JOIN models m ON m.version = p.model_version
ORDER BY p.seq;

-- name: taste_moved_most
-- Profiles whose taste moved most this week: cosine between the last-layer vector of the latest
-- published day and of the earliest published day of the 7 days before it, with what they did since.
WITH days AS (SELECT max(dt) AS last FROM profile_embeddings),
     first AS (SELECT min(dt) AS first FROM profile_embeddings, days WHERE dt >= last - INTERVAL 7 DAY),
     a AS (SELECT profile_id, emb_layer2_last AS v FROM profile_embeddings, first WHERE dt = first.first),
     b AS (SELECT profile_id, emb_layer2_last AS v FROM profile_embeddings, days WHERE dt = days.last),
     moved AS (SELECT profile_id, round(list_cosine_similarity(a.v, b.v), 4) AS cosine
               FROM a JOIN b USING (profile_id), days, first WHERE days.last > first.first)
SELECT m.profile_id, m.cosine, count(t.ts) AS tokens_this_week, mode(t.canvas) AS main_canvas,
       mode(t.title_name) AS most_seen_title
FROM moved m LEFT JOIN tokens_decoded t ON t.profile_id = m.profile_id
     AND t.dt > (SELECT first FROM first) AND t.dt <= (SELECT last FROM days)
GROUP BY m.profile_id, m.cosine ORDER BY m.cosine ASC, m.profile_id LIMIT 20;
