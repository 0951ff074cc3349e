-- Example analyst queries over the pipeline's tables: `fmpipe sql --name <name> [--param k=v]`.
-- Views: raw_events, quarantine, tokens, history, title_vocab, catalogue, profile_embeddings,
-- title_embeddings (dt partitions are a column).

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
