// SlotTable: which slot a stage-3 gather takes. Every rank must pick the same slot (a gather is
// a collective), so the choice may depend only on the sequence of calls: these cases are worked
// out by hand from the rule (a free slot first, else the least recently used slot nobody holds,
// never the slot holding the unit itself, -1 when every slot is held).
#include <gtest/gtest.h>

#include "engine/param_gatherer.hpp"

namespace {

using shardopt::detail::SlotTable;

TEST(SlotTable, FreeSlotsFirstThenLeastRecentlyUsedUnheld) {
  SlotTable t;
  t.reset(2, std::vector<char>(4, 0));
  EXPECT_EQ(t.slot_of(0), -1);
  EXPECT_EQ(t.choose(0), 0);  // both free and unused: the first
  t.bind(0, 0);               // tick 1
  t.hold(0);                  // tick 2
  EXPECT_EQ(t.slot_of(0), 0);
  EXPECT_EQ(t.choose(1), 1);  // slot 0 is held
  t.bind(1, 1);               // tick 3
  t.hold(1);                  // tick 4
  EXPECT_EQ(t.choose(2), -1);  // every slot held
  EXPECT_TRUE(t.drop(0));      // its last hold
  EXPECT_FALSE(t.drop(0));     // nothing left to drop
  EXPECT_EQ(t.choose(2), 0);   // the only unheld one
  EXPECT_TRUE(t.drop(1));
  EXPECT_EQ(t.choose(2), 0);   // both unheld: slot 0 used at tick 2, slot 1 at tick 4
  t.hold(0);                   // tick 5
  EXPECT_TRUE(t.drop(0));
  EXPECT_EQ(t.choose(2), 1);   // now slot 1 is the least recently used
  EXPECT_EQ(t.choose(1), 0);   // never the slot that already holds the unit
}

TEST(SlotTable, BindingMovesAUnitAndForgettingKeepsTheUseOrder) {
  SlotTable t;
  t.reset(2, std::vector<char>(3, 0));
  t.bind(0, 0);  // tick 1
  t.bind(1, 1);  // tick 2
  t.bind(0, 2);  // tick 3: unit 0 is evicted
  EXPECT_EQ(t.slot_of(0), -1);
  EXPECT_EQ(t.slot_of(2), 0);
  EXPECT_EQ(t.choose(0), 1);  // slot 1 (tick 2) is older than slot 0 (tick 3)
  t.forget_units();
  EXPECT_EQ(t.slot_of(1), -1);
  EXPECT_EQ(t.slot_of(2), -1);
  EXPECT_EQ(t.choose(0), 1);  // free now, still ordered by last use
}

TEST(SlotTable, PersistentUnitsAndDirectionOfTravel) {
  SlotTable t;
  t.reset(1, {0, 1, 0});
  EXPECT_FALSE(t.persistent(0));
  EXPECT_TRUE(t.persistent(1));
  EXPECT_EQ(t.travel(1), 1);   // the first unit keeps the initial direction (forward)
  EXPECT_EQ(t.travel(0), -1);  // moved back
  EXPECT_EQ(t.travel(0), -1);  // the same unit again changes nothing
  EXPECT_EQ(t.travel(2), 1);
}

}  // namespace
