-- Letterbox schema, version 24: a checklist item may link to several pages (the DNS item to each
-- domain whose records are missing or unchecked): a JSON list of [text, path] pairs; '' is none,
-- and `link` stays its one page (the alert mail's, the single "Fix it").
ALTER TABLE status_checks ADD COLUMN links TEXT NOT NULL DEFAULT '';
