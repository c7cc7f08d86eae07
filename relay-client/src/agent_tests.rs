//! The agent's table of requests in flight.

use super::*;

#[test]
fn the_table_of_requests_in_flight_gives_a_burst_s_room_back() {
    let map = InFlight::default();
    let ids: Vec<Arc<str>> = (0..3 * KEEP_ROOM).map(|i| i.to_string().into()).collect();
    for id in &ids {
        map.lock()
            .unwrap()
            .insert(id.clone(), CancellationToken::new());
    }
    for id in &ids[1..] {
        finished(&map, id);
    }
    // Not while one request is still in flight.
    assert!(map.lock().unwrap().capacity() > KEEP_ROOM);
    finished(&map, &ids[0]);
    assert!(map.lock().unwrap().capacity() <= KEEP_ROOM);
    // A small table keeps its room between requests.
    map.lock()
        .unwrap()
        .insert("a".into(), CancellationToken::new());
    let room = map.lock().unwrap().capacity();
    finished(&map, "a");
    assert_eq!(map.lock().unwrap().capacity(), room);
}
