-- The minimal Econia DSS schema of dss-v1.6.1 that fires the `econiaws` feed
-- (econia.md sections 2.2 and 2.4): nine tables, three enums, nine trigger functions.

CREATE SCHEMA aggregator;
CREATE TYPE order_status AS ENUM ('open', 'closed', 'cancelled');
CREATE TYPE order_type AS ENUM ('limit', 'market', 'swap');
CREATE TYPE order_direction AS ENUM ('sell', 'buy', 'ask', 'bid');

CREATE TABLE market_registration_events (
  txn_version numeric(20) NOT NULL, event_idx numeric(20) NOT NULL, market_id numeric(20) NOT NULL,
  time timestamptz NOT NULL, base_account_address varchar(70), base_module_name text,
  base_struct_name text, base_name_generic text, quote_account_address varchar(70) NOT NULL,
  quote_module_name text NOT NULL, quote_struct_name text NOT NULL, lot_size numeric(20) NOT NULL,
  tick_size numeric(20) NOT NULL, min_size numeric(20) NOT NULL, underwriter_id numeric(20) NOT NULL,
  PRIMARY KEY (txn_version, event_idx));
CREATE TABLE place_limit_order_events (
  txn_version numeric(20) NOT NULL, event_idx numeric(20) NOT NULL, time timestamptz NOT NULL,
  market_id numeric(20) NOT NULL, "user" varchar(70) NOT NULL, custodian_id numeric(20) NOT NULL,
  order_id numeric(39) NOT NULL, side boolean NOT NULL, integrator varchar(70) NOT NULL,
  initial_size numeric(20) NOT NULL, price numeric(20) NOT NULL, restriction smallint NOT NULL,
  self_match_behavior smallint NOT NULL, size numeric(20) NOT NULL,
  PRIMARY KEY (txn_version, event_idx));
CREATE TABLE place_market_order_events (
  txn_version numeric(20) NOT NULL, event_idx numeric(20) NOT NULL, market_id numeric(20) NOT NULL,
  time timestamptz NOT NULL, order_id numeric(39) NOT NULL, "user" varchar(70) NOT NULL,
  custodian_id numeric(20) NOT NULL, integrator varchar(70) NOT NULL, direction boolean NOT NULL,
  size numeric(20) NOT NULL, self_match_behavior smallint NOT NULL,
  PRIMARY KEY (txn_version, event_idx));
CREATE TABLE place_swap_order_events (
  txn_version numeric(20) NOT NULL, event_idx numeric(20) NOT NULL, market_id numeric(20) NOT NULL,
  time timestamptz NOT NULL, order_id numeric(39) NOT NULL, signing_account varchar(70) NOT NULL,
  integrator varchar(70) NOT NULL, direction boolean NOT NULL, min_base numeric(20) NOT NULL,
  max_base numeric(20) NOT NULL, min_quote numeric(20) NOT NULL, max_quote numeric(20) NOT NULL,
  limit_price numeric(20) NOT NULL, PRIMARY KEY (txn_version, event_idx));
CREATE TABLE fill_events (
  txn_version numeric(20) NOT NULL, event_idx numeric(20) NOT NULL,
  emit_address varchar(70) NOT NULL, time timestamptz NOT NULL,
  maker_address varchar(70) NOT NULL, maker_custodian_id numeric(20) NOT NULL,
  maker_order_id numeric(39) NOT NULL, maker_side boolean NOT NULL, market_id numeric(20) NOT NULL,
  price numeric(20) NOT NULL, sequence_number_for_trade numeric(20) NOT NULL,
  size numeric(20) NOT NULL, taker_address varchar(70) NOT NULL,
  taker_custodian_id numeric(20) NOT NULL, taker_order_id numeric(39) NOT NULL,
  taker_quote_fees_paid numeric(20) NOT NULL, PRIMARY KEY (txn_version, event_idx));
CREATE TABLE change_order_size_events (
  txn_version numeric(20) NOT NULL, event_idx numeric(20) NOT NULL, market_id numeric(20) NOT NULL,
  time timestamptz NOT NULL, order_id numeric(39) NOT NULL, "user" varchar(70) NOT NULL,
  custodian_id numeric(20) NOT NULL, side boolean NOT NULL, new_size numeric(20) NOT NULL,
  PRIMARY KEY (txn_version, event_idx));
CREATE TABLE cancel_order_events (
  txn_version numeric(20) NOT NULL, event_idx numeric(20) NOT NULL, time timestamptz NOT NULL,
  market_id numeric(20) NOT NULL, "user" varchar(70) NOT NULL, custodian_id numeric(20) NOT NULL,
  order_id numeric(39) NOT NULL, reason smallint NOT NULL, PRIMARY KEY (txn_version, event_idx));
CREATE TABLE recognized_market_events (
  txn_version numeric(20) NOT NULL, event_idx numeric(20) NOT NULL, time timestamptz NOT NULL,
  base_account_address varchar(70), base_module_name text, base_struct_name text,
  base_name_generic text, quote_account_address varchar(70) NOT NULL,
  quote_module_name text NOT NULL, quote_struct_name text NOT NULL, market_id numeric(20),
  lot_size numeric(20), tick_size numeric(20), min_size numeric(20), underwriter_id numeric(20),
  PRIMARY KEY (txn_version, event_idx));
CREATE TABLE aggregator.user_history (
  market_id numeric(20) NOT NULL, order_id numeric(39) NOT NULL, created_at timestamptz NOT NULL,
  last_updated_at timestamptz, integrator text NOT NULL, total_filled numeric(20) NOT NULL,
  remaining_size numeric(20) NOT NULL, order_status order_status NOT NULL,
  order_type order_type NOT NULL, "user" text, direction order_direction, price numeric(20,0),
  average_execution_price numeric(20,0), custodian_id numeric(20,0), self_match_behavior smallint,
  restriction smallint, last_increase_stamp numeric(39,0), min_base numeric(20,0),
  max_base numeric(20,0), min_quote numeric(20,0), max_quote numeric(20,0),
  total_fees_paid_in_quote_subunits numeric(20,0) NOT NULL, PRIMARY KEY (market_id, order_id));

CREATE FUNCTION notify_market_registration_event () RETURNS TRIGGER AS $$
BEGIN
   PERFORM pg_notify('econiaws', json_build_object('channel', 'market_registration_event', 'payload', NEW)::text);
   RETURN NEW;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER market_registration_events_trigger AFTER INSERT ON market_registration_events
FOR EACH ROW EXECUTE PROCEDURE notify_market_registration_event ();

CREATE FUNCTION notify_place_limit_order_event () RETURNS TRIGGER AS $$
BEGIN
   PERFORM pg_notify('econiaws', json_build_object('channel', 'place_limit_order_event', 'payload', NEW)::text);
   RETURN NEW;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER place_limit_order_events_trigger AFTER INSERT ON place_limit_order_events
FOR EACH ROW EXECUTE PROCEDURE notify_place_limit_order_event ();

CREATE FUNCTION notify_place_market_order_event () RETURNS TRIGGER AS $$
BEGIN
   PERFORM pg_notify('econiaws', json_build_object('channel', 'place_market_order_event', 'payload', NEW)::text);
   RETURN NEW;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER place_market_order_events_trigger AFTER INSERT ON place_market_order_events
FOR EACH ROW EXECUTE PROCEDURE notify_place_market_order_event ();

CREATE FUNCTION notify_place_swap_order_event () RETURNS TRIGGER AS $$
BEGIN
   PERFORM pg_notify('econiaws', json_build_object('channel', 'place_swap_order_event', 'payload', NEW)::text);
   RETURN NEW;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER place_swap_order_events_trigger AFTER INSERT ON place_swap_order_events
FOR EACH ROW EXECUTE PROCEDURE notify_place_swap_order_event ();

CREATE FUNCTION notify_fill_event () RETURNS TRIGGER AS $$
BEGIN
   PERFORM pg_notify('econiaws', json_build_object('channel', 'fill_event', 'payload', NEW)::text);
   RETURN NEW;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER fill_events_trigger AFTER INSERT ON fill_events
FOR EACH ROW EXECUTE PROCEDURE notify_fill_event ();

CREATE FUNCTION notify_change_order_size_event () RETURNS TRIGGER AS $$
BEGIN
   PERFORM pg_notify('econiaws', json_build_object('channel', 'change_order_size_event', 'payload', NEW)::text);
   RETURN NEW;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER change_order_size_events_trigger AFTER INSERT ON change_order_size_events
FOR EACH ROW EXECUTE PROCEDURE notify_change_order_size_event ();

CREATE FUNCTION notify_cancel_order_event () RETURNS TRIGGER AS $$
BEGIN
   PERFORM pg_notify('econiaws', json_build_object('channel', 'cancel_order_event', 'payload', NEW)::text);
   RETURN NEW;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER cancel_order_events_trigger AFTER INSERT ON cancel_order_events
FOR EACH ROW EXECUTE PROCEDURE notify_cancel_order_event ();

CREATE FUNCTION notify_recognized_market_event () RETURNS TRIGGER AS $$
BEGIN
   PERFORM pg_notify('econiaws', json_build_object('channel', 'recognized_market_event', 'payload', NEW)::text);
   RETURN NEW;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER recognized_market_events_trigger AFTER INSERT ON recognized_market_events
FOR EACH ROW EXECUTE PROCEDURE notify_recognized_market_event ();

CREATE FUNCTION notify_updated_order () RETURNS TRIGGER AS $$
BEGIN
    PERFORM pg_notify('econiaws', json_build_object('channel', 'updated_limit_order', 'payload', NEW)::text);
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER updated_order_trigger AFTER UPDATE ON aggregator.user_history
FOR EACH ROW EXECUTE PROCEDURE notify_updated_order ();
